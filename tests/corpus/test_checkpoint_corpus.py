"""Every bad checkpoint of the corpus is refused by the reader and by `alloy merge`: exit code 2,
one line naming the file and the problem, no output folder, and no pickle payload ever runs."""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from merge_ops.checkpoint import CheckpointReader
from merge_ops.errors import CheckpointError
from service.cli import main as alloy
from tests.corpus.make_corpus import CASES, MARKER, Payload, build_case, write_models, write_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    return write_models(tmp_path_factory.mktemp("clean"))


def names_file(msg: str, case, models: dict[str, Path]) -> bool:
    """The message names the offending file: its path, or its folder and its name."""
    folder = models[case.target]
    if not case.culprit:  # a mismatch between models: naming the model is enough
        return folder.name in msg
    return str(folder / case.culprit) in msg or (str(folder) in msg and case.culprit in msg)


def test_clean_models_merge(clean, tmp_path, capsys):
    """The control: the untouched corpus models merge, so every refusal below is the corruption's."""
    assert alloy(["merge", str(write_spec(tmp_path, clean)), "--out", str(tmp_path / "out"), "-q"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("case", [c for c in CASES if c.reader_refuses], ids=lambda c: c.name)
def test_reader_refuses(case, clean, tmp_path):
    models, marker = build_case(case, clean, tmp_path)
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(models[case.target])
    assert names_file(e.value.message, case, models) and case.needle in e.value.message, e.value.message
    assert not marker.exists()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_alloy_merge_refuses(case, clean, tmp_path, capsys):
    models, marker = build_case(case, clean, tmp_path)
    out = tmp_path / "out"
    code = alloy(["merge", str(write_spec(tmp_path, models)), "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("alloy: error: "), err
    assert names_file(err[0], case, models) and case.needle in err[0], err[0]
    assert not out.exists() and not list(tmp_path.glob(".out.*")), "a refused merge left files behind"
    assert not marker.exists(), "the pickle payload ran"


def test_pickle_payload_is_live(tmp_path):
    """The corpus' pickles really execute code when loaded the unsafe way (so the checks above can fail)."""
    marker = tmp_path / MARKER
    pickle.loads(pickle.dumps({"w": Payload(str(marker))}))  # what unpickling an input file would do
    assert marker.exists()


def test_cli_process_exit_code(clean, tmp_path):
    """Through the real `alloy` process: exit status 2 and exactly one stderr line."""
    case = next(c for c in CASES if c.name == "pickle_renamed_zip")
    models, marker = build_case(case, clean, tmp_path)
    r = subprocess.run([sys.executable, "-m", "service.cli", "merge", str(write_spec(tmp_path, models)),
                        "--out", str(tmp_path / "out"), "-q"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "this is a pickle" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_claimed_header_size_is_never_read_into_memory(clean, tmp_path):
    """A header length field claiming 1 GB (on a sparse file that long) is refused before any read."""
    from merge_ops.sources import resolve

    bad = tmp_path / "bad"
    bad.mkdir()
    n = 1 << 30
    with open(bad / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="limit"):
            resolve(str(bad))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"resolving read {peak / 2**20:.0f} MiB"
