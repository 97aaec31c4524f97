"""Named chat templates for `chat_template: <name>` (the names mergekit 0.1.5 accepts).

Each renders its model family's published prompt format. mergekit's own files for llama3, alpaca and
exaone leave Jinja expression lines untrimmed, so their renders carry stray newlines and indentation
(`<|eot_id|>\\n<|start_header_id|>`, an indented `[|user|]`) and alpaca's generation prompt is glued to
the last message; a model fine-tuned on its family's format would see a different prompt. Alloy writes
the family's format; chatml and mistral render exactly as mergekit's do
(`benchmarks/static_vs_mergekit.py --tokenizers` compares renders).
"""

CHAT_TEMPLATES: dict[str, str] = {
    # ChatML: every turn framed by <|im_start|>role ... <|im_end|>.
    "chatml": (
        "{%- for m in messages -%}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    # Llama 3: BOS once, header per turn, content trimmed, <|eot_id|> with no newline after it.
    "llama3": (
        "{{- bos_token -}}"
        "{%- for m in messages -%}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    ),
    # Alpaca: the last system message as preamble, then ### sections separated by a blank line.
    "alpaca": (
        "{%- set heads = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} -%}"
        "{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{%- set turns = messages | selectattr('role', 'in', heads) | list -%}"
        "{%- if system -%}{{- (system | last)['content'] | trim -}}{{- '\\n\\n' if turns else '' -}}{%- endif -%}"
        "{%- for m in turns -%}"
        "{{- heads[m['role']] + '\\n' + (m['content'] | trim) -}}{{- '' if loop.last else '\\n\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and turns and turns[-1]['role'] != 'assistant' -%}"
        "{{- '\\n\\n### Response:\\n' -}}"
        "{%- endif -%}"
    ),
    # Mistral instruct: an optional system message folded into the first [INST], strict alternation.
    "mistral": (
        "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
        "{%- set turns = messages[1:] if system is not none else messages -%}"
        "{{- bos_token -}}"
        "{%- for m in turns -%}"
        "{%- set expect = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}"
        "{%- if m['role'] not in ('user', 'assistant') -%}"
        "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
        "optional system message!') -}}"
        "{%- elif m['role'] != expect -%}"
        "{{- raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') -}}"
        "{%- elif m['role'] == 'user' -%}"
        "{{- ' [INST] ' + (system + '\\n\\n' if loop.first and system is not none else '') + m['content'] + ' [/INST]' -}}"
        "{%- else -%}"
        "{{- ' ' + m['content'] + eos_token -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # EXAONE 3: an empty system turn when none is given; user turns end in a newline, others in [|endofturn|].
    "exaone": (
        "{%- for m in messages -%}"
        "{%- if loop.first and m['role'] != 'system' -%}{{- '[|system|][|endofturn|]\\n' -}}{%- endif -%}"
        "{{- '[|' + m['role'] + '|]' + m['content'] + ('\\n' if m['role'] == 'user' else '[|endofturn|]\\n') -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"
    ),
}
