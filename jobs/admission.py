"""What a spec may ask of this server beyond its own validation: the admission rules.

Checked when a job or a schedule is submitted (POST /v1/jobs, POST /v1/schedules) and again at
every scheduled run, since the rules (allowed roots, tokens, calibration sets) may change after a
schedule was made. A refusal is an `AdmissionError` (an invalid spec: the API answers 422).
"""

from __future__ import annotations

from pathlib import Path

from jobs.settings import Settings
from jobs.store import Store
from jobs.webhooks import url_problem
from merge_ops.calibration import check_calibration
from merge_ops.errors import CalibrationError, InputError, SpecError
from merge_ops.refs import parse_model_ref
from merge_ops.sources import check_links
from merge_ops.spec import MergeSpec


class AdmissionError(SpecError):
    """A valid spec this server does not accept; the message says what to change."""


def check_admission(spec: MergeSpec, tenant: str, store: Store, settings: Settings) -> None:
    """Raise AdmissionError when the spec asks for something the server does not allow."""
    refs = ([spec.base] if spec.base else []) + [e.model for e in spec.experts]
    for ref in refs:
        r = parse_model_ref(ref)
        if r.local_path is not None:
            p = Path(r.local_path.removeprefix("file://")).expanduser()
            if not p.is_absolute() or not any(p.resolve().is_relative_to(root) for root in settings.roots):
                raise AdmissionError(f"{ref!r}: local model folders must be absolute paths under the "
                                     "server's allowed roots (ALLOY_ALLOWED_ROOTS); or use a hub id")
            if p.resolve().is_dir():  # links inside the folder must stay under the roots too
                try:
                    check_links(p.resolve(), settings.roots, ref)
                except InputError as e:
                    raise AdmissionError(e.message) from None
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
    if spec.notify is not None:
        why = url_problem(spec.notify.url, settings.webhook_allow)
        if settings.webhook_secret is None:
            why = "webhooks are disabled on this server (no ALLOY_WEBHOOK_SECRET): remove `notify`"
        if why:
            raise AdmissionError(why)
    if spec.publish is not None and spec.publish.hub == "hf" and tenant not in settings.hub_tokens:
        raise AdmissionError("publish.hub is `hf` but no hub token is configured for this tenant (ask the "
                             "operator to set ALLOY_HUB_TOKENS)")
