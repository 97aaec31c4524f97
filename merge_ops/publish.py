"""Publishing a merged folder as a new revision of a repo, exactly once per job.

    Publisher.publish(folder, repo, branch=, tag=, job_id=, message=) -> PublishedRef
    Publisher.find_commit(repo, job_id, branch=) -> PublishedRef | None

Exactly once: every commit carries its job id (`Alloy-Job-Id: <id>` in the commit description, a
field in the local log). `publish` first looks for a commit with the job id on the branch and
returns it instead of committing again, so a worker that crashed between committing and recording
the result finds its commit on retry (and still creates the tag if the crash came before it).

All or nothing: everything that can refuse a publish (names, the folder, the repo, a tag that
exists) is checked before the branch moves, so a publish that raises has not moved the branch. Once
the commit is on the branch, `publish` no longer raises: the commit is the job's result. On the
local hub the tag is written with the branch (one refs.json replace). A Hugging Face Hub has no
atomic commit+tag and no branch reset, so the tag is created after the commit; if it cannot be (a
concurrent writer took the name between the check and the create, or the hub keeps refusing), the
result is the branch commit with `warning` saying so, and the job succeeds untagged: its record says
what the hub holds. A commit request that fails without an answer is looked up by job id before
reporting failure (it may have landed).

    LocalHub(root)        the embedded default: a folder of repos with immutable revisions
    HfHubPublisher(...)   a Hugging Face Hub (or any server speaking its API: HF_ENDPOINT)

Hub tokens never appear in raised errors (scrubbed, exception chains dropped).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from merge_ops.errors import InputError, PublishError
from merge_ops.refs import check_ref_name, is_repo_id
from merge_ops.sources import scrub

JOB_TRAILER = "Alloy-Job-Id"


@dataclass(frozen=True)
class PublishedRef:
    repo: str
    revision: str  # the tag if one was asked for (and created), else the branch
    commit: str
    url: str | None = None
    warning: str | None = None  # the commit is published but something asked for was not (the tag)


class Publisher(Protocol):
    def publish(self, folder: Path, repo: str, *, branch: str = "main", tag: str | None = None,
                job_id: str | None = None, message: str = "Alloy merge") -> PublishedRef: ...

    def find_commit(self, repo: str, job_id: str, branch: str = "main") -> PublishedRef | None: ...


def job_marker(job_id: str) -> str:
    return f"{JOB_TRAILER}: {job_id}"


def carries_job(text: str, job_id: str) -> bool:
    """True when a commit message holds the job's trailer line (exact id, not a prefix of another)."""
    return re.search(rf"^{re.escape(job_marker(job_id))}\s*$", text or "", re.MULTILINE) is not None


def _check_names(repo: str, branch: str, tag: str | None) -> None:
    # the spec checked these already; a library caller may not have built one
    if not is_repo_id(repo):
        raise InputError(f"{repo!r} is not a repo id: use org/name (letters, digits, '_', '-', '.')")
    for what, name in (("branch", branch), ("tag", tag)):
        if name is not None and (why := check_ref_name(name)):
            raise InputError(f"{what} {why}")


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"nothing to publish: {folder} is not a folder")
    files = [(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*")) if p.is_file()]
    if not files:
        raise PublishError(f"nothing to publish: {folder} is empty")
    return files


# -- the local folder hub -------------------------------------------------------------------------
class LocalHub:
    """Repos in a folder; every publish is a new immutable revision.

        root/<org>/<name>/revisions/<commit>/   the model files of one revision
        root/<org>/<name>/refs.json             {"branches": {name: commit}, "tags": {name: commit}}
        root/<org>/<name>/commits.jsonl         one line per commit: commit, parent, branch, message,
                                                job_id, time, tree

    A revision is written to `.staging/` next to `revisions/` and renamed into place, then logged,
    then the branch moves (refs.json replaced atomically): a crash at any point leaves either the old
    state or a complete new revision, never half a model under a name a reader resolves. The commit id
    is a sha1 of parent + content + job id + message, like git's.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------------------
    def _dir(self, repo: str) -> Path:
        if not is_repo_id(repo):
            raise InputError(f"{repo!r} is not a repo id: use org/name")
        return self.root / repo

    def refs(self, repo: str) -> dict[str, dict[str, str]]:
        p = self._dir(repo) / "refs.json"
        return json.loads(p.read_text()) if p.is_file() else {"branches": {}, "tags": {}}

    def log(self, repo: str) -> dict[str, dict]:
        """Every logged commit by id (a crash may leave one no branch reaches)."""
        p = self._dir(repo) / "commits.jsonl"
        if not p.is_file():
            return {}
        out = {}
        for line in p.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a torn last line from a crash mid-append
                continue
            out[entry["commit"]] = entry
        return out

    def commits(self, repo: str, branch: str = "main") -> list[dict]:
        """The branch history, newest first."""
        head = self.refs(repo)["branches"].get(branch)
        log = self.log(repo)
        out = []
        while head is not None and head in log:
            out.append(log[head])
            head = log[head]["parent"]
        return out

    def resolve_revision(self, repo: str, revision: str = "main") -> str:
        """A branch, tag or commit id -> the commit id."""
        refs = self.refs(repo)
        commit = refs["branches"].get(revision) or refs["tags"].get(revision)
        if commit is None and (self._dir(repo) / "revisions" / revision).is_dir() and _is_sha1(revision):
            commit = revision
        if commit is None:
            if not (self._dir(repo) / "refs.json").is_file():
                raise InputError(f"repo {repo!r} does not exist in the local hub at {self.root}")
            raise InputError(f"revision {revision!r} not found in local hub repo {repo}: use a branch, "
                             "tag or commit id that exists")
        return commit

    def path(self, repo: str, revision: str = "main") -> Path:
        """The folder holding `repo` at `revision` (to load it, e.g. with transformers)."""
        return self._dir(repo) / "revisions" / self.resolve_revision(repo, revision)

    def _ref(self, repo: str, revision: str, commit: str) -> PublishedRef:
        return PublishedRef(repo, revision, commit, (self._dir(repo) / "revisions" / commit).resolve().as_uri())

    def find_commit(self, repo: str, job_id: str, branch: str = "main") -> PublishedRef | None:
        for entry in self.commits(repo, branch):
            if entry.get("job_id") == job_id:
                return self._ref(repo, branch, entry["commit"])
        return None

    # -- writing ---------------------------------------------------------------------------------
    @contextmanager
    def _locked(self, repo: str) -> Iterator[None]:
        d = self._dir(repo)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def publish(self, folder: Path, repo: str, *, branch: str = "main", tag: str | None = None,
                job_id: str | None = None, message: str = "Alloy merge") -> PublishedRef:
        _check_names(repo, branch, tag)
        files = _folder_files(folder)
        d = self._dir(repo)
        with self._locked(repo):
            if job_id is not None and (found := self.find_commit(repo, job_id, branch)) is not None:
                return self._tagged(repo, branch, tag, found.commit)
            _check_tag_free(self.refs(repo), repo, tag)  # fail before the copy, not after
        _sweep_staging(d / ".staging")
        # copy outside the lock (it is the slow part); the tree digest comes from the same read
        staging = d / ".staging" / uuid.uuid4().hex
        try:
            tree = _copy_hashed(files, staging)
            with self._locked(repo):
                if job_id is not None and (found := self.find_commit(repo, job_id, branch)) is not None:
                    shutil.rmtree(staging)  # a concurrent attempt of the same job won the race
                    return self._tagged(repo, branch, tag, found.commit)
                refs = self.refs(repo)
                _check_tag_free(refs, repo, tag)
                parent = refs["branches"].get(branch)
                commit = hashlib.sha1(
                    f"parent {parent}\ntree {tree}\njob {job_id}\n\n{message}".encode()).hexdigest()
                target = d / "revisions" / commit
                target.parent.mkdir(exist_ok=True)
                if target.exists():  # an earlier attempt renamed it, then crashed: same content
                    shutil.rmtree(staging)
                else:
                    staging.rename(target)
                _fsync_dir(target.parent)
                entry = {"commit": commit, "parent": parent, "branch": branch, "message": message,
                         "job_id": job_id, "time": time.time(), "tree": tree}
                _append_line(d / "commits.jsonl", json.dumps(entry).encode())
                refs["branches"][branch] = commit
                if tag is not None:
                    refs["tags"][tag] = commit
                self._write_refs(repo, refs)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return self._ref(repo, tag or branch, commit)

    def _tagged(self, repo: str, branch: str, tag: str | None, commit: str) -> PublishedRef:
        """The job's commit is already on the branch (an earlier attempt): tag it if the tag is free;
        a tag someone else took meanwhile leaves it untagged, with a warning (never an error: the
        branch has moved, so the publish happened)."""
        if tag is None:
            return self._ref(repo, branch, commit)
        refs = self.refs(repo)
        have = refs["tags"].get(tag)
        if have is not None and have != commit:
            ref = self._ref(repo, branch, commit)
            return PublishedRef(ref.repo, ref.revision, ref.commit, ref.url, warning=_tag_taken(tag, repo, have,
                                                                                              commit, branch))
        if have is None:
            refs["tags"][tag] = commit
            self._write_refs(repo, refs)
        return self._ref(repo, tag, commit)

    def _write_refs(self, repo: str, refs: dict) -> None:
        p = self._dir(repo) / "refs.json"
        tmp = p.with_name(f".refs.{uuid.uuid4().hex}.tmp")
        with open(tmp, "w") as fh:
            json.dump(refs, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(p)


def _tag_taken(tag: str, repo: str, have: str, commit: str, branch: str) -> str:
    return (f"tag {tag!r} was created on {repo} by another writer (at {have[:12]}) after this job checked "
            f"it: the merge is published as commit {commit[:12]} on {branch}, untagged")


def _check_tag_free(refs: dict, repo: str, tag: str | None) -> None:
    if tag is not None and tag in refs["tags"]:
        raise PublishError(f"tag {tag!r} already exists on {repo} (commit {refs['tags'][tag][:12]}): "
                           "choose another tag")


def _append_line(path: Path, line: bytes) -> None:
    with open(path, "ab+") as fh:  # appends land at the end whatever was read before
        size = fh.seek(0, os.SEEK_END)
        if size:
            fh.seek(size - 1)
            if fh.read(1) != b"\n":
                fh.write(b"\n")  # end a line torn by a crash, or this entry would join it
        fh.write(line + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def _sweep_staging(staging: Path, max_age_s: float = 86400) -> None:
    """Remove copies left by publishers killed mid-copy (never visible; they only take space)."""
    if not staging.is_dir():
        return
    for p in staging.iterdir():
        try:
            if time.time() - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except FileNotFoundError:  # another publisher finished with it meanwhile
            pass


def _is_sha1(s: str) -> bool:
    return len(s) == 40 and all(c in "0123456789abcdef" for c in s)


def _copy_hashed(files: list[tuple[str, Path]], dest: Path) -> str:
    """Copy files under dest (fsynced) and return a sha256 over (path, content sha256) of all of them."""
    tree = hashlib.sha256()
    for rel, src in files:
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(src, "rb") as fi, open(out, "wb") as fo:
            while chunk := fi.read(8 << 20):
                h.update(chunk)
                fo.write(chunk)
            fo.flush()
            os.fsync(fo.fileno())
        tree.update(f"{rel}\0{h.hexdigest()}\n".encode())
    return tree.hexdigest()


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- Hugging Face Hub -----------------------------------------------------------------------------
class HfHubPublisher:
    """Publishes with huggingface_hub: one `create_commit` per publish (all files added, files the
    new revision no longer has deleted), guarded by `parent_commit` so a concurrent writer makes it
    fail (HTTP 412) instead of interleaving. Endpoint and token default to HF_ENDPOINT / HF_TOKEN."""

    def __init__(self, endpoint: str | None = None, token: str | None = None, *, private: bool = True):
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
        self.token = token or os.environ.get("HF_TOKEN") or None
        self.private = private

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token)

    def _url(self, repo: str, commit: str) -> str:
        return f"{self.endpoint or 'https://huggingface.co'}/{repo}/tree/{commit}"

    def _error(self, e: Exception, what: str) -> PublishError:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = {401: "the hub token is missing or invalid", 403: "the hub token may not write to this repo",
                409: "another commit is in progress on this repo; retry",
                412: "the branch moved while publishing (a concurrent commit); retry"}.get(status)
        detail = scrub(str(e), self.token).strip().splitlines()
        text = f"{what} failed on {self.endpoint or 'huggingface.co'}"
        text += f": {hint}" if hint else ""
        text += f" ({detail[0]})" if detail else ""
        return PublishError(text)

    def find_commit(self, repo: str, job_id: str, branch: str = "main") -> PublishedRef | None:
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            commits = self._api().list_repo_commits(repo, revision=branch)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return None
        except Exception as e:  # scrubbed: the token must not leak through the message or the chain
            raise self._error(e, f"listing commits of {repo}@{branch}") from None
        for c in commits:
            if carries_job(c.message, job_id) or carries_job(c.title, job_id):
                return PublishedRef(repo, branch, c.commit_id, self._url(repo, c.commit_id))
        return None

    def publish(self, folder: Path, repo: str, *, branch: str = "main", tag: str | None = None,
                job_id: str | None = None, message: str = "Alloy merge") -> PublishedRef:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.hf_api import RepoFile

        _check_names(repo, branch, tag)
        files = _folder_files(folder)
        api = self._api()
        step = f"creating {repo}"
        try:  # until the commit lands, any failure leaves the branch (and the tags) as they were
            api.create_repo(repo, exist_ok=True, private=self.private)
            if branch != "main":
                step = f"creating branch {branch} of {repo}"
                api.create_branch(repo, branch=branch, exist_ok=True)
            found = self.find_commit(repo, job_id, branch) if job_id is not None else None
            if found is not None:  # an earlier attempt committed: only the tag may be missing
                return self._tag_after_commit(api, repo, branch, tag, found.commit, message)
            step = f"checking tag {tag} of {repo}"
            if tag is not None and (have := self._tags(api, repo).get(tag)) is not None:
                raise PublishError(f"tag {tag!r} already exists on {repo} (commit {have[:12]}): choose another "
                                   f"tag; nothing was published ({branch} is unchanged)")
            step = f"committing to {repo}@{branch}"
            head = api.repo_info(repo, revision=branch).sha
            have_files = {f.path for f in api.list_repo_tree(repo, revision=head, recursive=True)
                          if isinstance(f, RepoFile)}
            ops: list = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in files]
            keep = {rel for rel, _ in files} | {".gitattributes"}
            ops += [CommitOperationDelete(path_in_repo=p, is_folder=False) for p in sorted(have_files - keep)]
            description = job_marker(job_id) if job_id is not None else ""
        except PublishError:
            raise
        except Exception as e:  # scrubbed: the token must not leak through the message or the chain
            raise self._error(e, step) from None
        try:
            info = api.create_commit(repo, operations=ops, commit_message=message,
                                     commit_description=description, revision=branch, parent_commit=head)
        except Exception as e:
            # the request may have landed and only its answer been lost: the job id tells
            landed = self._landed(repo, job_id, branch)
            if landed is None:
                raise self._error(e, step) from None
            return self._tag_after_commit(api, repo, branch, tag, landed, message)
        return self._tag_after_commit(api, repo, branch, tag, info.oid, message)

    def _tags(self, api, repo: str) -> dict[str, str]:
        return {t.name: t.target_commit for t in api.list_repo_refs(repo).tags}

    def _landed(self, repo: str, job_id: str | None, branch: str) -> str | None:
        if job_id is None:
            return None
        try:
            found = self.find_commit(repo, job_id, branch)
        except PublishError:
            return None
        return None if found is None else found.commit

    def _tag_after_commit(self, api, repo: str, branch: str, tag: str | None, commit: str, message: str,
                          tries: int = 3) -> PublishedRef:
        """The commit is on the branch: this never raises. The tag is created (a few tries for a
        flaky hub); a tag taken by another writer, or one the hub keeps refusing, gives the branch
        ref with a warning, so the job's record matches the hub."""
        url = self._url(repo, commit)
        if tag is None:
            return PublishedRef(repo, branch, commit, url)
        problem = ""
        for _ in range(tries):
            try:
                have = self._tags(api, repo).get(tag)
                if have == commit:  # ours (an earlier attempt, or a create whose answer was lost)
                    return PublishedRef(repo, tag, commit, url)
                if have is not None:
                    return PublishedRef(repo, branch, commit, url, warning=_tag_taken(tag, repo, have, commit,
                                                                                      branch))
                api.create_tag(repo, tag=tag, revision=commit, tag_message=message)
                return PublishedRef(repo, tag, commit, url)
            except Exception as e:  # a 409 (taken meanwhile) is read back on the next try
                problem = str(self._error(e, f"tagging {repo} {tag}"))
        return PublishedRef(repo, branch, commit, url, warning=f"the merge is published as commit {commit[:12]} "
                            f"on {branch}, but tag {tag!r} could not be created ({problem}): tag it by hand")


def make_publisher(kind: Literal["local", "hf"], *, root: str | Path | None = None,
                   endpoint: str | None = None, token: str | None = None, private: bool = True) -> Publisher:
    """The publisher for a spec's `publish.hub`: "local" needs `root`; "hf" uses endpoint/token
    (or HF_ENDPOINT / HF_TOKEN)."""
    if kind == "local":
        if root is None:
            raise ValueError("the local hub needs a root folder")
        return LocalHub(root)
    if kind == "hf":
        return HfHubPublisher(endpoint=endpoint, token=token, private=private)
    raise InputError(f"unknown hub kind {kind!r}: use 'local' or 'hf'")
