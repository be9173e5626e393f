"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, so that pushing and loading are tested offline.

It answers what huggingface_hub (2.x) sends for `create_repo`, `upload_folder` / `create_commit` (with its check
of README.md's metadata block) and `hf_hub_download`. The preupload call answers "regular" for every file (no
LFS, no Xet), so the commit carries each file base64-encoded in its ndjson body; downloads answer HEAD and GET on
`<repo>/resolve/<revision>/<file>` with the headers hf_hub_download reads (X-Repo-Commit, ETag, Content-Length)
and `X-Error-Code` on a 404. Every repository lives in memory; any revision name reads the latest commit. Given an
`accepted_token`, it answers 401 to any request that does not carry it, as the Hub does to a bad token.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{REPO}/preupload/(?P<revision>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{REPO}/commit/(?P<revision>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{REPO}(/revision/(?P<revision>[^/]+))?$"), "repo_info"),
    ("GET", re.compile(rf"^/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"), "download"),
    ("HEAD", re.compile(rf"^/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"), "download"),
]


class HubStandIn:
    """`with HubStandIn() as hub:` serves on `hub.endpoint`; `hub.files[repo_id]` maps paths to uploaded bytes."""

    def __init__(self, accepted_token: str | None = None) -> None:
        self.accepted_token = accepted_token
        self.files: dict[str, dict[str, bytes]] = {}
        self.commit_ids: dict[str, str] = {}
        self.unanswered: list[str] = []  # requests no route matched: what a newer client may need
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler_class())
        self.server.daemon_threads = True  # a client that hangs up badly must not block the test's exit
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "HubStandIn":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()

    def client_environment(self, folder: Path) -> dict[str, str]:
        """huggingface_hub's variables for a client process: this endpoint, every cache under `folder`, no Xet."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": str(folder / "hf_home"),
            "HF_HUB_CACHE": str(folder / "hub_cache"),
            "HF_MODULES_CACHE": str(folder / "modules"),
            "HF_HUB_DISABLE_XET": "1",
        }

    def publish(self, repo_id: str, folder: Path) -> None:
        """Put every file of `folder` in `repo_id` as one commit, as if it had been pushed."""
        self.files[repo_id] = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
        self.commit_ids[repo_id] = hashlib.sha1(repo_id.encode()).hexdigest()

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.dispatch(self, "GET")

            def do_HEAD(self) -> None:
                hub.dispatch(self, "HEAD")

            def do_POST(self) -> None:
                hub.dispatch(self, "POST")

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        return Handler

    def dispatch(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path = request.path.split("?")[0]
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        if self.accepted_token is not None and request.headers.get("Authorization") != f"Bearer {self.accepted_token}":
            message = "Invalid credentials in Authorization header"
            status, headers, payload = 401, {"X-Error-Message": message}, json.dumps({"error": message}).encode()
        else:
            status, headers, payload = self.route(method, path, body)
        request.send_response(status)
        for key, value in {"Content-Length": str(len(payload)), **headers}.items():
            request.send_header(key, value)
        request.end_headers()
        if method != "HEAD":
            request.wfile.write(payload)

    def route(self, method: str, path: str, body: bytes) -> tuple[int, dict, bytes]:
        """The answer of the route that serves `method` on `path`; a 404 for a request none serves."""
        for route_method, pattern, name in ROUTES:
            match = pattern.match(path)
            if route_method == method and match:
                with self.lock:
                    return getattr(self, name)(body=body, **match.groupdict())
        self.unanswered.append(f"{method} {path}")
        return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "not served"}'

    @staticmethod
    def json_reply(content: dict, status: int = 200) -> tuple[int, dict, bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(content).encode()

    def create_repo(self, body: bytes) -> tuple[int, dict, bytes]:
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
        self.files.setdefault(repo_id, {})
        self.commit_ids.setdefault(repo_id, "0" * 40)
        return self.json_reply({"url": f"{self.endpoint}/{repo_id}", "name": repo_id})

    def validate_yaml(self, body: bytes) -> tuple[int, dict, bytes]:
        """The Hub rejects a README.md whose metadata block is not a YAML mapping; so does the stand-in."""
        metadata = yaml.safe_load(json.loads(body)["content"].split("---")[1])
        if not isinstance(metadata, dict):
            return self.json_reply({"errors": [{"message": "metadata must be a mapping"}]}, 400)
        return self.json_reply({"errors": [], "warnings": []})

    def preupload(self, body: bytes, repo: str, revision: str) -> tuple[int, dict, bytes]:
        files = json.loads(body)["files"]
        modes = [{"path": file["path"], "uploadMode": "regular", "shouldIgnore": False} for file in files]
        return self.json_reply({"files": modes})

    def commit(self, body: bytes, repo: str, revision: str) -> tuple[int, dict, bytes]:
        if repo not in self.files:
            return self.json_reply({"error": f"no repo {repo}"}, 404)
        for line in body.decode().splitlines():
            entry = json.loads(line)
            if entry["key"] == "file":
                self.files[repo][entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
        digest = hashlib.sha1()
        for path, content in sorted(self.files[repo].items()):
            digest.update(path.encode() + hashlib.sha256(content).digest())
        self.commit_ids[repo] = digest.hexdigest()
        commit_url = f"{self.endpoint}/{repo}/commit/{self.commit_ids[repo]}"
        return self.json_reply({"commitUrl": commit_url, "commitOid": self.commit_ids[repo]})

    def repo_info(self, body: bytes, repo: str, revision: str | None) -> tuple[int, dict, bytes]:
        if repo not in self.files:
            return 404, {"X-Error-Code": "RepoNotFound"}, b"{}"
        siblings = [{"rfilename": path} for path in sorted(self.files[repo])]
        info = {"id": repo, "modelId": repo, "sha": self.commit_ids[repo], "private": False, "siblings": siblings}
        return self.json_reply(info)

    def download(self, body: bytes, repo: str, revision: str, path: str) -> tuple[int, dict, bytes]:
        if repo not in self.files:
            return 404, {"X-Error-Code": "RepoNotFound"}, b"{}"
        if path not in self.files[repo]:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commit_ids[repo]}, b"{}"
        content = self.files[repo][path]
        headers = {"X-Repo-Commit": self.commit_ids[repo], "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}
        return 200, headers, content
