"""What a spec may ask of this server beyond its own validation: the admission rules.

Checked when a job or a schedule is submitted (POST /v1/jobs, POST /v1/schedules) and again at
every scheduled run, since the rules (allowed roots, tokens, calibration sets) may change after a
schedule was made. The worker checks the model sources and the publish target once more before it
reads or publishes anything. A refusal is an `AdmissionError` (an invalid spec: the API answers 422).

The server's own data is never a model source, even when the data dir lies under an allowed root:
the data dir itself, its own folders (`DATA_AREAS`: the local hub, uploaded calibration sets, job
outputs, the hub download cache, evaluation sets) and the hub root wherever it is. Model folders the
operator keeps elsewhere under the data dir (say `DATA_DIR/models/...`) stay readable. Links inside a
model folder may not lead into those folders nor to the data dir's own files (the database, the dev
token), since a linked `tokenizer.json` would be copied into a published model.
"""

from __future__ import annotations

import os
from pathlib import Path

from jobs.egress import url_problem
from jobs.settings import Settings
from jobs.store import Store
from merge_ops.calibration import check_calibration
from merge_ops.errors import CalibrationError, InputError, SpecError
from merge_ops.lora.config import check_adapter_folder, is_adapter_folder
from merge_ops.refs import parse_model_ref, ref_parts, split_adapter_ref
from merge_ops.slices_spec import check_local_ranges
from merge_ops.sources import check_links
from merge_ops.spec import MergeSpec

DATA_AREAS = ("hub", "calibration", "jobs", "cache", "evaluation")
_MAX_WALK = 10_000  # entries, as merge_ops.sources.check_links (which refuses bigger folders first)


class AdmissionError(SpecError):
    """A valid spec this server does not accept; the message says what to change."""


def server_areas(settings: Settings) -> list[Path]:
    """Folders holding the server's own data: never read as (part of) a model."""
    data = settings.data_dir.resolve()
    return [*(data / a for a in DATA_AREAS), settings.hub_root.resolve()]


def _in_server_data(path: Path, settings: Settings, *, file: bool) -> bool:
    data = settings.data_dir.resolve()
    if path == data or any(path.is_relative_to(a) for a in server_areas(settings)):
        return True
    return file and path.parent == data  # alloy.db, dev-token, ... (folders beside them are the operator's)


def _local_paths(spec: MergeSpec) -> list[tuple[str, Path]]:
    out = []
    for ref in ([spec.base] if spec.base else []) + [e.model for e in spec.experts]:
        for part in ref_parts(ref):  # `model+adapter`: both folders are sources
            r = parse_model_ref(part)
            if r.local_path is not None:
                out.append((part, Path(r.local_path.removeprefix("file://")).expanduser()))
    return out


def check_adapters(spec: MergeSpec) -> None:
    """Local LoRA adapters (PEFT folders) at submit: a readable, supported adapter_config.json and
    safetensors weights (hub adapters are checked when the worker resolves them), and a model to apply
    each one to. Messages name the field."""
    fields = ([("base", spec.base)] if spec.base else []) + [
        (f"experts[{i}].model", e.model) for i, e in enumerate(spec.experts)]
    for field, ref in fields:
        model, adapter = split_adapter_ref(ref)
        for part in ref_parts(ref):
            r = parse_model_ref(part)
            if r.local_path is None:
                continue
            folder = Path(r.local_path.removeprefix("file://")).expanduser().resolve()
            if not folder.is_dir() or not is_adapter_folder(folder):
                if part == adapter and folder.is_dir():
                    raise AdmissionError(f"{field}: {part!r} after '+' is not a PEFT LoRA adapter folder (it needs "
                                         "adapter_config.json and adapter_model.safetensors, and no model weights)")
                continue
            if part == model and (adapter is not None or field == "base" or spec.base is None):
                raise AdmissionError(f"{field}: {part!r} is a LoRA adapter with no model to apply it to: write "
                                     "model+adapter" + ("" if field == "base" else ", or set `base`"))
            try:
                check_adapter_folder(folder, part)
            except InputError as e:
                raise AdmissionError(f"{field}: {e.message}") from None


def check_model_sources(spec: MergeSpec, settings: Settings) -> None:
    """Local model folders: absolute, under the allowed roots, outside the server's own data, and with
    no link leading out of the roots or into the server's data. Raises AdmissionError."""
    for ref, p in _local_paths(spec):
        if not p.is_absolute() or not any(p.resolve().is_relative_to(root) for root in settings.roots):
            raise AdmissionError(f"{ref!r}: local model folders must be absolute paths under the "
                                 "server's allowed roots (ALLOY_ALLOWED_ROOTS); or use a hub id")
        folder = p.resolve()
        if _in_server_data(folder, settings, file=False):
            raise AdmissionError(f"{ref!r} is inside the server's data directory (its hub, calibration sets, "
                                 "job outputs or caches), which is never a model source: use a hub id "
                                 "(org/name@revision) for published models")
        if folder.is_dir():  # links inside the folder must stay under the roots and out of the data
            try:
                check_links(folder, settings.roots, ref)
            except InputError as e:
                raise AdmissionError(e.message) from None
            _check_link_targets(folder, ref, settings)


def _check_link_targets(folder: Path, ref: str, settings: Settings) -> None:
    seen = 0
    for dirpath, dirnames, filenames in os.walk(folder):  # never follows directory links
        for name in [*dirnames, *filenames]:
            seen += 1
            if seen > _MAX_WALK:
                return
            entry = Path(dirpath) / name
            if entry.is_symlink():
                target = entry.resolve()
                if _in_server_data(target, settings, file=not target.is_dir()):
                    raise AdmissionError(f"{ref}/{entry.relative_to(folder)} is a link into the server's "
                                         "data directory, which is never a model source: copy the file "
                                         "into the model folder instead")


def publish_problem(spec: MergeSpec, tenant: str, settings: Settings, *, admin: bool | None = None) -> str | None:
    """Why this tenant may not publish where the spec says, or None. Local-hub orgs belong to tenants
    (ALLOY_HUB_NAMESPACES; by default the org named like the tenant); on a Hugging Face Hub the
    tenant's own token decides what it may write."""
    if spec.publish is None:
        return None
    if spec.publish.hub == "hf":
        if tenant not in settings.hub_tokens:
            return ("publish.hub is `hf` but no hub token is configured for this tenant (ask the operator "
                    "to set ALLOY_HUB_TOKENS)")
        return None
    if admin if admin is not None else settings.is_admin_tenant(tenant):
        return None
    org = spec.publish.repo.split("/", 1)[0]
    orgs = settings.hub_orgs(tenant)
    if org not in orgs:
        mine = ", ".join(repr(o) for o in orgs) or "none"
        return (f"publish.repo: {spec.publish.repo!r} is in the org {org!r}, which tenant {tenant!r} may not "
                f"publish to on this server's hub; its orgs: {mine} (ALLOY_HUB_NAMESPACES)")
    return None


def quota_used(store: Store, settings: Settings, tenant: str) -> int | None:
    """The tenant's queued + running jobs when that reaches its quota (ALLOY_MAX_ACTIVE_JOBS_PER_TENANT),
    else None. Every job counts, whoever made it: a submit (429) and a scheduled run (recorded as
    skipped or deferred) are both refused past it. Counted before the insert: a soft cap, by a few."""
    cap = settings.max_active_jobs_per_tenant
    if not cap:
        return None
    n = store.count_active(tenant)
    return n if n >= cap else None


def check_admission(spec: MergeSpec, tenant: str, store: Store, settings: Settings, *,
                    admin: bool | None = None) -> None:
    """Raise AdmissionError when the spec asks for something the server does not allow.

    `admin`: whether the caller holds the admin scope (None: any admin token of the tenant counts,
    for checks made without a request, such as scheduled runs)."""
    check_model_sources(spec, settings)
    check_adapters(spec)
    try:  # layer slices against the depth of local models, now known to lie under the roots (hub: at run time)
        check_local_ranges(spec)
    except SpecError as e:
        raise AdmissionError(e.message, param=e.param) from None
    if spec.calibration is not None:
        files = {}
        for task, ref in spec.calibration.tasks.items():
            # the service reads uploaded sets only: a file path names the server's disk, never read
            cs = store.get_calibration_set(ref.set_id, tenant) if ref.set_id is not None else None
            if cs is None:
                raise AdmissionError(f"calibration.tasks.{task}: no calibration set {ref.raw!r}; upload one "
                                     "with POST /v1/calibration-sets and use its id")
            files[task] = Path(cs.path)
        try:  # the rows against the model that reads them (text needs a local base's tokenizer files)
            check_calibration(spec, files)
        except CalibrationError as e:
            raise AdmissionError(e.message) from None
    if spec.evaluate is not None:
        _check_evaluation_sets(spec, tenant, store)
    if spec.notify is not None:
        why = url_problem(spec.notify.url, settings.webhook_allow)
        if settings.webhook_secret is None:
            why = "webhooks are disabled on this server (no ALLOY_WEBHOOK_SECRET): remove `notify`"
        if why:
            raise AdmissionError(why)
    if (why := publish_problem(spec, tenant, settings, admin=admin)) is not None:
        raise AdmissionError(why, param="publish.repo")


def _check_evaluation_sets(spec: MergeSpec, tenant: str, store: Store) -> None:
    """Evaluation sets are uploaded sets (POST /v1/calibration-sets?purpose=evaluation), read and
    checked here; a file path names the server's disk and is never read."""
    from merge_ops.evaluation import EvalSetError, parse_eval_set

    assert spec.evaluate is not None
    for name, s in spec.evaluate.set_specs().items():
        cs = store.get_calibration_set(s.set, tenant) if s.set.startswith("cal_") else None
        if cs is None:
            raise AdmissionError(f"evaluate.sets.{name}: no evaluation set {s.set!r}; upload one with "
                                 "POST /v1/calibration-sets?purpose=evaluation and use its id")
        try:
            parse_eval_set(Path(cs.path).read_bytes(), kind=s.kind, source=s.set)  # messages name the id
        except EvalSetError as e:
            raise AdmissionError(f"evaluate.sets.{name}: {e.message}") from None
