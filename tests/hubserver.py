"""A small server that speaks the part of the Hugging Face Hub HTTP API that `huggingface_hub` uses.

Enough for the real client to `create_repo`, `create_commit`/`upload_folder` (preupload + the NDJSON
commit endpoint), `list_repo_commits`, `list_repo_refs`, `create_tag`/`create_branch`, `model_info`,
`list_repo_tree`, `get_paths_info` and `snapshot_download`/`hf_hub_download` (resolve). Every file is
a regular git blob (preupload answers "regular"), so neither LFS nor Xet is spoken; the client is
told nothing that would route it to either.

State lives in memory (repos, commits, refs) with blob bytes under a temp folder; every commit is
kept so tests can count the commits carrying a job id. Tests also push commits directly with
`HubServer.push` (e.g. "an expert was retrained").

    with serve_hub(token="hf_test") as hub:
        HfApi(endpoint=hub.url, token="hf_test").create_repo("org/x")
        hub.push("org/x", {"config.json": b"{}"})

Fault injection for failure-order tests: `hub.inject("commit", status=500)` fails the next commit
request before it is applied; `after=True` applies it, then answers the error (a lost response);
`hook=fn` runs `fn()` first (e.g. a concurrent writer creating the tag) and then serves normally.
Actions are the path part after the repo id: commit, tag, refs, commits, preupload, revision, ...

Run standalone for manual use: `python -m tests.hubserver --port 8765`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, unquote

import uvicorn
import yaml
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

_COMMIT = frozenset("0123456789abcdef")


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1, the oid the client computes for regular files (skips unchanged ones)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    id: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, tuple[str, int]]  # path -> (blob oid, size)


@dataclass
class Repo:
    id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        revision = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if len(revision) == 40 and set(revision) <= _COMMIT and revision in self.commits:
            return revision
        return None

    def history(self, commit: str) -> list[Commit]:
        out = []
        c: str | None = commit
        while c is not None:
            out.append(self.commits[c])
            c = self.commits[c].parent
        return out


@dataclass
class Fault:
    """One injected failure: the next `times` requests of `method` to `action` fail with `status`."""

    action: str
    method: str = "POST"
    status: int | None = 500
    times: int = 1
    after: bool = False  # apply the request, then answer the error (the client never sees the result)
    hook: Callable[[], None] | None = None  # run before serving the request (a concurrent writer)
    hits: int = 0


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubState:
    """The repos and their commits; thread-safe, shared by the HTTP handlers and `push`."""

    def __init__(self, blob_dir: Path):
        self.blob_dir = blob_dir
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()

    # -- storage ---------------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        p = self.blob_dir / oid
        if not p.exists():
            tmp = p.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(p)
        return oid

    def blob(self, oid: str) -> bytes:
        return (self.blob_dir / oid).read_bytes()

    def repo(self, repo_id: str) -> Repo:
        r = self.repos.get(repo_id)
        if r is None:
            raise _HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return r

    def commit_at(self, repo: Repo, revision: str) -> Commit:
        c = repo.resolve(revision)
        if c is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[c]

    # -- writes ----------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, private: bool = False) -> bool:
        """Create a repo with an initial commit (as the Hub does); False if it already exists."""
        with self.lock:
            if repo_id in self.repos:
                return False
            self.repos[repo_id] = Repo(repo_id, private)
            self.commit(repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                        title="initial commit", _new_branch=True)
            return True

    def commit(self, repo_id: str, branch: str, add: Mapping[str, bytes], delete: tuple[str, ...] = (),
               *, title: str, message: str = "", parent: str | None = None,
               _new_branch: bool = False) -> Commit:
        with self.lock:
            repo = self.repo(repo_id)
            head = repo.branches.get(branch)
            if head is None and not _new_branch:
                raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent is not None and parent != head:
                raise _HubError(412, f"A commit has happened since. Please refresh and try again "
                                     f"(parent {parent} is not the head of {branch})")
            files = dict(repo.commits[head].files) if head else {}
            for path in delete:
                path = path.rstrip("/")
                gone = [p for p in files if p == path or p.startswith(path + "/")]
                if not gone:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del files[p]
            for path, data in add.items():
                files[path] = (self.put_blob(data), len(data))
            date = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            tree = json.dumps(sorted(files.items()))
            cid = hashlib.sha1(f"{head}\n{tree}\n{title}\n{message}\n{date}\n{time.time_ns()}".encode()).hexdigest()
            c = Commit(cid, head, title, message, date, files)
            repo.commits[cid] = c
            repo.branches[branch] = cid
            return c


def _json(data, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=headers)


def _tree_entries(files: dict[str, tuple[str, int]], prefix: str, recursive: bool) -> list[dict]:
    prefix = prefix.strip("/")
    under = {p: v for p, v in files.items() if not prefix or p.startswith(prefix + "/")}
    out: dict[str, dict] = {}
    for path, (oid, size) in sorted(under.items()):
        rest = path[len(prefix) + 1:] if prefix else path
        parts = rest.split("/")
        # folders along the way are listed too (recursive) or only the first level (not recursive)
        for depth in range(1, len(parts)):
            folder = "/".join(([prefix] if prefix else []) + parts[:depth])
            out.setdefault(folder, {"type": "directory", "path": folder,
                                    "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if not recursive:
                break
        if recursive or len(parts) == 1:
            out[path] = {"type": "file", "path": path, "size": size, "oid": oid}
    return list(out.values())


class HubApp:
    """The ASGI app. Routes on the raw path: revisions may hold '/' (quoted as %2F by the client)."""

    def __init__(self, state: HubState, token: str | None = None):
        self.state = state
        self.token = token
        self.base_url = ""  # set once the port is known, used in returned URLs
        self.faults: list[Fault] = []
        self._faults_lock = threading.Lock()

    def _take_fault(self, action: str, method: str) -> Fault | None:
        with self._faults_lock:
            for f in self.faults:
                if f.action == action and f.method == method and f.hits < f.times:
                    f.hits += 1
                    return f
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        request = Request(scope, receive)
        try:
            response = await self.dispatch(request)
        except _HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            response = _json({"error": e.message}, e.status, headers)
        await response(scope, receive, send)

    def _auth(self, request: Request) -> None:
        if self.token is None:
            return
        got = request.headers.get("authorization", "")
        if not got:
            raise _HubError(401, "Authorization header is required")
        if got != f"Bearer {self.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")

    async def dispatch(self, request: Request) -> Response:
        raw = request.scope.get("raw_path") or request.scope["path"].encode()
        segs = [unquote(s) for s in raw.decode().split("?")[0].strip("/").split("/")]
        method = request.method
        self._auth(request)
        if segs[:2] == ["api", "validate-yaml"]:
            return await self.validate_yaml(request)
        if segs[:3] == ["api", "repos", "create"]:
            return await self.create_repo(request)
        if segs[:3] == ["api", "repos", "delete"]:
            body = await request.json()
            rid = f"{body.get('organization')}/{body['name']}"
            with self.state.lock:
                self.state.repo(rid)
                del self.state.repos[rid]
            return _json({})
        if segs[:2] == ["api", "whoami-v2"]:
            return _json({"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})
        if len(segs) >= 4 and segs[0] == "api" and segs[1] == "models":
            repo_id, action, rest = f"{segs[2]}/{segs[3]}", (segs[4] if len(segs) > 4 else ""), segs[5:]
            fault = self._take_fault(action, method)
            if fault is not None and fault.hook is not None:
                fault.hook()
            if fault is not None and fault.status is not None and not fault.after:
                raise _HubError(fault.status, f"injected failure of {method} {action}")
            response = await self.repo_api(request, method, repo_id, action, rest)
            if fault is not None and fault.status is not None and fault.after:
                raise _HubError(fault.status, f"injected failure of {method} {action} (after applying it)")
            return response
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self.resolve(request, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        raise _HubError(404, f"no route for {method} /{'/'.join(segs)}")

    async def repo_api(self, request: Request, method: str, repo_id: str, action: str,
                       rest: list[str]) -> Response:
        st = self.state
        with st.lock:
            repo = st.repo(repo_id)
            if action == "" and method == "GET":
                return _json(self.info(repo, repo.branches["main"]))
            if action == "revision" and method == "GET":
                return _json(self.info(repo, st.commit_at(repo, rest[0]).id))
            if action == "refs" and method == "GET":
                def ref(kind, name, target):
                    return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": target}
                out = {"branches": [ref("heads", n, c) for n, c in repo.branches.items()],
                       "tags": [ref("tags", n, c) for n, c in repo.tags.items()], "converts": []}
                if request.query_params.get("include_prs"):
                    out["pullRequests"] = []
                return _json(out)
            if action == "commits" and method == "GET":
                head = st.commit_at(repo, rest[0] if rest else "main")
                return _json([{"id": c.id, "title": c.title, "message": c.message, "date": c.date,
                               "authors": [{"user": "tester"}]} for c in repo.history(head.id)])
            if action == "tree" and method == "GET":
                c = st.commit_at(repo, rest[0])
                recursive = request.query_params.get("recursive", "").lower() in ("1", "true")
                path = "/".join(rest[1:])
                if path and path not in c.files and not any(p.startswith(path + "/") for p in c.files):
                    raise _HubError(404, f"{path} not found", "EntryNotFound")
                return _json(_tree_entries(c.files, path, recursive))
        if action == "paths-info" and method == "POST":
            form = parse_qs((await request.body()).decode())
            with st.lock:
                c = st.commit_at(repo, rest[0])
                entries = _tree_entries(c.files, "", True)
            wanted = set(form.get("paths", []))
            return _json([e for e in entries if e["path"] in wanted])
        if action == "preupload" and method == "POST":
            body = await request.json()
            with st.lock:
                head = repo.resolve(rest[0])
                files = repo.commits[head].files if head else {}
            return _json({"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 **({"oid": files[f["path"]][0]} if f["path"] in files else {})}
                for f in body["files"]]})
        if action == "commit" and method == "POST":
            return await self.commit(request, repo_id, rest[0])
        if action == "tag" and method == "POST":
            body = await request.json()
            with st.lock:
                c = st.commit_at(repo, rest[0])
                if body["tag"] in repo.tags:
                    raise _HubError(409, f"Tag {body['tag']} already exists")
                repo.tags[body["tag"]] = c.id
            return _json({})
        if action == "tag" and method == "DELETE":
            with st.lock:
                if repo.tags.pop(rest[0], None) is None:
                    raise _HubError(404, f"Invalid rev id: {rest[0]}", "RevisionNotFound")
            return _json({})
        if action == "branch" and method == "POST":
            body = await request.json() if await request.body() else {}
            name = "/".join(rest)
            with st.lock:
                if name in repo.branches:
                    raise _HubError(409, f"Branch {name} already exists")
                start = body.get("startingPoint") or "main"
                repo.branches[name] = st.commit_at(repo, start).id
            return _json({})
        if action == "branch" and method == "DELETE":
            with st.lock:
                if repo.branches.pop("/".join(rest), None) is None:
                    raise _HubError(404, "Invalid rev id", "RevisionNotFound")
            return _json({})
        raise _HubError(404, f"no route for {method} /api/models/{repo_id}/{action}")

    def info(self, repo: Repo, commit: str) -> dict:
        c = repo.commits[commit]
        return {"_id": repo.id, "id": repo.id, "modelId": repo.id, "author": repo.id.split("/")[0],
                "sha": commit, "private": repo.private, "disabled": False, "gated": False,
                "lastModified": c.date, "createdAt": repo.history(commit)[-1].date, "tags": [],
                "downloads": 0, "likes": 0, "siblings": [{"rfilename": p} for p in sorted(c.files)]}

    async def create_repo(self, request: Request) -> Response:
        body = await request.json()
        if body.get("type") not in (None, "model"):
            raise _HubError(400, "this test hub only holds model repos")
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else f"tester/{body['name']}"
        url = f"{self.base_url}/{repo_id}"
        if not self.state.create_repo(repo_id, private=body.get("visibility") == "private"):
            return _json({"error": "You already created this model repo", "url": url}, 409)
        return _json({"url": url, "name": repo_id, "id": repo_id})

    async def validate_yaml(self, request: Request) -> Response:
        content = (await request.json()).get("content", "")
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content.split("---", 2)[1])
            except yaml.YAMLError as e:
                return _json({"errors": [{"message": f"invalid YAML: {e}"}]}, 400)
            if meta is not None and not isinstance(meta, dict):
                return _json({"errors": [{"message": "metadata must be a mapping"}]}, 400)
        return _json({"errors": [], "warnings": []})

    async def commit(self, request: Request, repo_id: str, branch: str) -> Response:
        if request.query_params.get("create_pr"):
            raise _HubError(400, "this test hub does not do pull requests")
        lines = [json.loads(x) for x in (await request.body()).splitlines() if x.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "first NDJSON line must be the header")
        header = lines[0]["value"]
        add: dict[str, bytes] = {}
        delete: list[str] = []
        for line in lines[1:]:
            key, val = line["key"], line["value"]
            if key == "file":
                if val.get("encoding") != "base64":
                    raise _HubError(400, "file content must be base64")
                add[val["path"]] = base64.b64decode(val["content"])
            elif key in ("deletedFile", "deletedFolder"):
                delete.append(val["path"])
            else:
                raise _HubError(400, f"operation {key!r} is not supported by this test hub (regular files only)")
        c = self.state.commit(repo_id, branch, add, tuple(delete), title=header["summary"],
                              message=header.get("description", ""), parent=header.get("parentCommit"))
        return _json({"success": True, "commitOid": c.id, "commitUrl": f"{self.base_url}/{repo_id}/commit/{c.id}",
                      "pullRequestUrl": None})

    def resolve(self, request: Request, repo_id: str, revision: str, path: str) -> Response:
        with self.state.lock:
            repo = self.state.repo(repo_id)
            c = self.state.commit_at(repo, revision)
            entry = c.files.get(path)
        if entry is None:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": c.id})
        oid, size = entry
        headers = {"X-Repo-Commit": c.id, "ETag": f'"{oid}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return Response(b"", headers={**headers, "Content-Length": str(size)})
        data = self.state.blob(oid)
        rng = request.headers.get("range", "")
        if rng.startswith("bytes="):
            lo, _, hi = rng[6:].partition("-")
            start, end = int(lo or 0), int(hi) if hi else size - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return Response(data[start:end + 1], status_code=206, headers=headers)
        return Response(data, headers=headers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HubServer:
    """The test hub running in a background thread: `url` is the endpoint to give the client."""

    def __init__(self, root: Path | None = None, *, token: str | None = None, port: int | None = None):
        self._tmp = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="alloy-testhub-")
            root = Path(self._tmp.name)
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self.state = HubState(root / "blobs")
        self.token = token
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = HubApp(self.state, token)
        self.app.base_url = self.url
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="on"))
        self._thread: threading.Thread | None = None

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._server.run, name="testhub", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"test hub did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- fault injection -------------------------------------------------------------------------
    def inject(self, action: str, *, method: str = "POST", status: int | None = 500, times: int = 1,
               after: bool = False, hook: Callable[[], None] | None = None) -> Fault:
        """Make the next `times` requests to `action` fail (see the module doc); returns the fault
        (its `hits` counts the requests it caught)."""
        f = Fault(action, method, status, times, after, hook)
        with self.app._faults_lock:
            self.app.faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self.app._faults_lock:
            self.app.faults.clear()

    def tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        """Create a tag directly (another writer)."""
        with self.state.lock:
            repo = self.state.repo(repo_id)
            repo.tags[tag] = self.state.commit_at(repo, revision).id
            return repo.tags[tag]

    def tags(self, repo_id: str) -> dict[str, str]:
        with self.state.lock:
            return dict(self.state.repo(repo_id).tags)

    # -- direct access for tests (no HTTP) -------------------------------------------------------
    def create_repo(self, repo_id: str) -> None:
        self.state.create_repo(repo_id)

    def push(self, repo_id: str, files: Mapping[str, bytes | Path], *, message: str = "update",
             description: str = "", branch: str = "main", delete: tuple[str, ...] = ()) -> str:
        """Commit files to a repo (creating it if needed), as a person pushing a new version would."""
        self.state.create_repo(repo_id)
        add = {p: (d.read_bytes() if isinstance(d, Path) else d) for p, d in files.items()}
        return self.state.commit(repo_id, branch, add, delete, title=message, message=description).id

    def push_folder(self, repo_id: str, folder: Path, **kw) -> str:
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.push(repo_id, files, **kw)

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self.state.lock:
            return self.state.repo(repo_id).branches[branch]

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """The branch history, newest first."""
        with self.state.lock:
            repo = self.state.repo(repo_id)
            return repo.history(repo.branches[branch])

    def all_commits(self, repo_id: str) -> list[Commit]:
        """Every commit ever made to the repo, on any branch, including ones no branch reaches."""
        with self.state.lock:
            return list(self.state.repo(repo_id).commits.values())

    def read(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        with self.state.lock:
            repo = self.state.repo(repo_id)
            oid, _ = self.state.commit_at(repo, revision).files[path]
        return self.state.blob(oid)

    def files(self, repo_id: str, revision: str = "main") -> list[str]:
        with self.state.lock:
            return sorted(self.state.commit_at(self.state.repo(repo_id), revision).files)


@contextmanager
def serve_hub(root: Path | None = None, *, token: str | None = None) -> Iterator[HubServer]:
    hub = HubServer(root, token=token).start()
    try:
        yield hub
    finally:
        hub.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the Hub-protocol test server in the foreground.")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--root", type=Path, default=None, help="blob folder (default: a temp dir)")
    ap.add_argument("--token", default=None, help="require this bearer token")
    args = ap.parse_args()
    hub = HubServer(args.root, token=args.token, port=args.port)
    print(f"test hub on {hub.url} (HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1)", flush=True)
    hub._server.run()


if __name__ == "__main__":
    main()
