"""Serving the page to many visitors: the queue bounded per session and per address, uploads bounded
per address before they reach the disk, every other request's body bounded and refused when it names
a file by a web address (which Gradio would download into its cache, past the upload bounds), the
visitor's address behind trusted proxies, and the one place that reads Gradio's queue records
(`running_event`)."""
from __future__ import annotations

import os
import threading
import time

import gradio as gr

from dtrak_core.images import MAX_UPLOAD_BYTES

MAX_PENDING_PER_SESSION = int(os.environ.get("DTRAK_MAX_PENDING_PER_SESSION", 4))  # queued + running
MAX_PENDING_PER_CLIENT = int(os.environ.get("DTRAK_MAX_PENDING_PER_CLIENT", 12))  # per address, all its sessions


def trusted_proxies(environ=os.environ) -> int:
    """How many reverse proxies stand in front of the server, each appending to X-Forwarded-For the
    address it was reached from: $DTRAK_TRUSTED_PROXIES (a whole number), else 1 on a Hugging Face
    Space (which sets $SPACE_ID and serves through one proxy), else 0 (reached directly)."""
    raw = environ.get("DTRAK_TRUSTED_PROXIES")
    if raw is None or not raw.strip():
        return 1 if environ.get("SPACE_ID") else 0
    try:
        n = int(raw.strip())
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"DTRAK_TRUSTED_PROXIES must be a whole number >= 0 (the reverse proxies in front of the "
                         f"server: 0 when reached directly, 1 on a Hugging Face Space), got {raw!r}")
    return n
TRUSTED_PROXIES = trusted_proxies()  # X-Forwarded-For hops to trust (`client_address`)
UPLOAD_WINDOW_SECONDS = float(os.environ.get("DTRAK_UPLOAD_WINDOW_SECONDS", 600))  # the window of the two below
# files per address per window: the drawing canvas uploads its layers (about 3 small PNGs) on every
# stroke, so the count is generous and the bytes below bound the disk
UPLOADS_PER_WINDOW = int(os.environ.get("DTRAK_UPLOADS_PER_WINDOW", 600))
UPLOAD_MB_PER_WINDOW = float(os.environ.get("DTRAK_UPLOAD_MB_PER_WINDOW", 50))  # MB per address per window
UPLOAD_CACHE_MB = float(os.environ.get("DTRAK_UPLOAD_CACHE_MB", 500))  # Gradio's upload cache, all visitors
CACHE_SWEEP = (600, 1800)  # every 10 min, delete uploads and outputs older than 30 min
# the body of any other request (a queue join, an API call: the inputs as JSON, files by reference)
MAX_REQUEST_BYTES = int(float(os.environ.get("DTRAK_MAX_REQUEST_KB", 1024)) * 1024)


def client_address(request, proxies: int | None = None) -> str:
    """The visitor's address, for the per-address limits: the socket's peer when no proxy is
    trusted (`TRUSTED_PROXIES` 0, the default: X-Forwarded-For is ignored, since any client can
    write it, on a LAN too); behind n trusted proxies (1 on a Space), the n-th entry from the end
    of X-Forwarded-For, the one the outermost trusted proxy appended (what a client wrote into the
    header itself lies further left). A header with fewer entries did not pass every trusted
    proxy: the peer then. proxies: overrides `TRUSTED_PROXIES`."""
    proxies = TRUSTED_PROXIES if proxies is None else proxies
    client = getattr(request, "client", None)
    peer = getattr(client, "host", None) or "unknown"
    if proxies <= 0 or request is None:
        return peer
    headers = request.headers
    values = headers.getlist("x-forwarded-for") if hasattr(headers, "getlist") else [headers.get("x-forwarded-for", "")]
    hops = [h.strip() for h in ",".join(v for v in values if v).split(",")]
    if len(hops) < proxies or not hops[-proxies]:
        return peer
    return hops[-proxies]


def bound_queue_per_visitor(queue, per_session: int = MAX_PENDING_PER_SESSION,
                            per_client: int = MAX_PENDING_PER_CLIENT) -> None:
    """Refuse a queue join when its session, or its address over all its sessions, already has
    that many requests queued or running, so that one visitor cannot fill the queue for everyone.

    Gradio bounds only the whole queue (`max_size`); this wraps its `push`, which every queued event
    goes through, and counts the events the queue still holds (queued and running). The refusal is
    an "error" join (HTTP 400), whose message the page shows as it is ("queue_full" would show
    Gradio's generic text).
    """
    push = queue.push

    async def bounded_push(body, request, username):
        session = body.session_hash
        address = client_address(request)
        events = list(queue.event_ids_to_events.values())
        mine = sum(1 for e in events if session is not None and e.session_hash == session)
        theirs = sum(1 for e in events if client_address(e.request) == address)
        if mine >= per_session or theirs >= per_client:
            return False, (f"You already have {max(mine, 1) if mine >= per_session else theirs} requests waiting or running; "
                           "wait for them to finish (this server is shared by every visitor)."), "error"
        return await push(body, request, username)

    queue.push = bounded_push


class UploadLimits:
    """What one address may upload through Gradio's upload route, and how large the upload cache may
    grow, checked before the body is read (`admit`, from Content-Length) and once it is buffered in
    memory (`count_files`), never after it is written. Thread-safe; times are `time.monotonic()`.

    per window of `window` seconds, per address: `files` files and `mb` MB (what was admitted
    counts, whether Gradio then kept it or not); per request: `max_file_bytes` (the per-file limit)
    plus the multipart framing; all visitors together: the upload cache (Gradio's folder, swept of
    files older than 30 minutes by `CACHE_SWEEP`) at most `cache_mb` MB, uploads in flight included.
    Any other request's body (`UploadGate`): at most `max_call` bytes.
    """

    FRAMING = 64 * 1024  # multipart headers and boundaries around a file's bytes

    def __init__(self, files: int = UPLOADS_PER_WINDOW, mb: float = UPLOAD_MB_PER_WINDOW,
                 window: float = UPLOAD_WINDOW_SECONDS, cache_mb: float = UPLOAD_CACHE_MB,
                 max_file_bytes: int = MAX_UPLOAD_BYTES, cache_dir: str | None = None,
                 max_call: int = MAX_REQUEST_BYTES):
        self.files, self.bytes, self.window = int(files), int(mb * 2**20), float(window)
        self.max_call = int(max_call)
        self.cache_bytes, self.max_request = int(cache_mb * 2**20), int(max_file_bytes) + self.FRAMING
        self.max_file_bytes = int(max_file_bytes)
        self._cache_dir = cache_dir
        self._lock = threading.Lock()
        self._recent: dict[str, list] = {}  # address -> [[time, files, bytes], ...] in the window
        self._in_flight = 0  # bytes admitted and not yet finished
        self._measured = (-1e9, 0)  # (when, bytes) of the last walk of the cache folder

    @property
    def cache_dir(self) -> str:
        if self._cache_dir is None:
            from gradio.utils import get_upload_folder

            self._cache_dir = get_upload_folder()
        return self._cache_dir

    def cache_size(self, max_age: float = 2.0) -> int:
        """Bytes in the upload cache folder, walked at most every `max_age` seconds."""
        now = time.monotonic()
        with self._lock:
            when, size = self._measured
        if now - when <= max_age:
            return size
        size = 0
        for folder, _, names in os.walk(self.cache_dir):
            for name in names:
                try:
                    size += os.lstat(os.path.join(folder, name)).st_size
                except OSError:  # swept meanwhile
                    pass
        with self._lock:
            self._measured = (now, size)
        return size

    def _used(self, address: str, now: float) -> tuple[int, int, float]:
        """(files, bytes, seconds until the oldest leaves the window) of `address` in the window."""
        recent = [r for r in self._recent.get(address, []) if now - r[0] < self.window]
        if recent:
            self._recent[address] = recent
        else:
            self._recent.pop(address, None)
        wait = self.window - (now - recent[0][0]) if recent else 0.0
        return sum(r[1] for r in recent), sum(r[2] for r in recent), wait

    def admit(self, address: str, length: int | None):
        """(entry, None) when a request of `length` bytes from `address` may go on (the entry is what
        `count_files` and `done` take), else (None, (status, message, retry-after seconds or None))."""
        mb = _size
        if length is None:
            return None, (411, "An upload must say its size (Content-Length).", None)
        if length > self.max_request:
            return None, (413, f"The file is over {mb(self.max_file_bytes)}, the upload limit of this server.", None)
        cached = self.cache_size()
        now = time.monotonic()
        with self._lock:
            if len(self._recent) > 1000:  # forget the addresses that have left the window
                for other in list(self._recent):
                    self._used(other, now)
            files, used, wait = self._used(address, now)
            if files + 1 > self.files or used + length > self.bytes:
                return None, (429, f"Too many uploads from your address: {files} file(s), {mb(used)} in the last "
                                   f"{self.window / 60:.0f} minutes (the limit is {self.files} files and "
                                   f"{mb(self.bytes)}). Try again in {wait:.0f} s.", max(1, int(wait + 1)))
            if cached + self._in_flight + length > self.cache_bytes:
                return None, (503, "The server's upload space is full (uploads are kept 30 minutes); try again in a "
                                   "few minutes.", 60)
            entry = [now, 1, length]
            self._recent.setdefault(address, []).append(entry)
            self._in_flight += length
        return entry, None

    def count_files(self, address: str, entry: list, files: int):
        """None when the `files` files of an admitted request fit the address's window, else its refusal."""
        with self._lock:
            entry[1] = max(1, files)
            total, _, wait = self._used(address, time.monotonic())
            if total > self.files:
                return (429, f"Too many files from your address: this request holds {files}, and the limit is "
                             f"{self.files} files in {self.window / 60:.0f} minutes. Try again in {wait:.0f} s.",
                        max(1, int(wait + 1)))
        return None

    def done(self, entry: list) -> None:
        with self._lock:
            self._in_flight -= entry[2]
            when, size = self._measured  # what it wrote counts until the next walk of the folder
            self._measured = (when, size + entry[2])


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{max(1, round(n / 1024))} KB"


def remote_files(body: bytes) -> list[str]:
    """The web addresses (http://, https://) that a JSON request body gives as the `path` of a file
    (Gradio's FileData: {"path": ..., "meta": {"_type": "gradio.FileData"}}, anywhere in the body);
    [] for a body that is not JSON. Gradio downloads such a file into its upload cache before the
    handler runs, with no size limit and past every bound of the upload route."""
    import json

    try:
        content = json.loads(body)
    except (ValueError, RecursionError):
        return []
    found, todo = [], [content]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            path = node.get("path")
            if isinstance(path, str) and path.strip().lower().startswith(("http://", "https://")):
                found.append(path)
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return found


def _multipart_parts(content_type: str, body: bytes) -> int:
    """How many parts (files) a multipart body holds, counted by its boundary (1 when it has none)."""
    import re

    found = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if not found:
        return 1
    return max(1, body.count(b"--" + found.group(1).strip().encode("latin-1")) - 1)


class UploadGate:
    """ASGI middleware in front of Gradio's routes that take a body.

    Uploads (POST .../gradio_api/upload): one over its address's window or the cache's size is
    refused (HTTP 429, 413, 411 or 503, with a message a person can read, and Retry-After) before its
    body is written to disk; an admitted one is read into memory (at most the per-file limit plus
    framing), its files counted, and then handed to Gradio as it came.

    Every other POST (queue joins, API calls): its body is read into memory, at most the limits'
    `max_call` bytes (over it, 413), and refused (400) when it gives a file by a web address
    (`remote_files`), since Gradio would download that file into its cache, unbounded; files reach
    the app only through the upload route. Everything else passes untouched.

    A refusal is a complete response the client can read: a body that fits the bound is read to
    its end first; one declared larger is answered at once, without reading it (uvicorn reads and
    drops the rest, and keeps the connection; closing it instead, with the body still arriving,
    would reset the connection under the answer). `limits`: an `UploadLimits`."""

    def __init__(self, app, limits: UploadLimits):
        self.app, self.limits = app, limits

    @staticmethod
    def is_upload(scope) -> bool:
        return (scope["type"] == "http" and scope.get("method") == "POST"
                and scope.get("path", "").rstrip("/").endswith("/gradio_api/upload"))

    @staticmethod
    def has_body(scope) -> bool:
        return scope["type"] == "http" and scope.get("method") in ("POST", "PUT", "PATCH")

    async def __call__(self, scope, receive, send):
        if not self.is_upload(scope):
            if self.has_body(scope):
                return await self._call(scope, receive, send)
            return await self.app(scope, receive, send)
        from starlette.requests import Request

        request = Request(scope)
        address = client_address(request)
        try:
            length = int(request.headers["content-length"])
            length = length if length >= 0 else None
        except (KeyError, ValueError):
            length = None
        entry, refusal = self.limits.admit(address, length)
        if refusal is not None:
            if length is not None and length <= self.limits.max_request:
                await self._drain(receive)  # so that the client reads the answer instead of a reset connection
            return await self._refuse(send, *refusal)
        try:
            body, complete = await self._read(receive, length)
            if not complete:
                return await self._refuse(send, 400, "The upload's body does not match its Content-Length.", None)
            refusal = self.limits.count_files(address, entry, _multipart_parts(request.headers.get("content-type"),
                                                                                body))
            if refusal is not None:
                return await self._refuse(send, *refusal)
            return await self.app(scope, self._replay(body, receive), send)
        finally:
            self.limits.done(entry)

    @staticmethod
    def _replay(body: bytes, receive):
        """A receive that gives the app `body` whole, then what the client sends next (its disconnect)."""
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return replay

    async def _call(self, scope, receive, send):
        """A queue join or API call: its body bounded and its files checked (`remote_files`)."""
        from starlette.datastructures import Headers

        bound, most = _size(self.limits.max_call), self.limits.max_call
        try:
            length = int(Headers(scope=scope)["content-length"])
        except (KeyError, ValueError):
            length = None  # chunked: counted as it comes
        if length is not None and length > most:
            return await self._refuse(send, 413, f"The request is over {bound}, the limit of this server for "
                                                 "anything but a file upload.", None)
        body, complete = await self._read(receive, most if length is None else length, exact=length is not None)
        if body is None:
            return await self._refuse(send, 413, f"The request is over {bound}, the limit of this server for "
                                                 "anything but a file upload.", None)
        if not complete:
            return await self._refuse(send, 400, "The request's body does not match its Content-Length.", None)
        if remote_files(body):
            return await self._refuse(send, 400, "A file in this request is given by a web address; this server "
                                                 "does not download files: upload the file itself (the page's "
                                                 "upload box, or POST it to the upload route first).", None)
        return await self.app(scope, self._replay(body, receive), send)

    async def _read(self, receive, length: int, exact: bool = True) -> tuple[bytes | None, bool]:
        """(the body, whether it came whole): at most `length` bytes, which must all come (exact:
        the Content-Length), else at most `length` (a chunked body: None past it, the rest unread)."""
        chunks, got = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", False
            chunk = message.get("body", b"")
            got += len(chunk)
            if got > length:
                return (b"", False) if exact else (None, False)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), got == length or not exact

    async def _drain(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return

    async def _refuse(self, send, status: int, message: str, retry_after) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if retry_after is not None:
            headers.append((b"retry-after", str(int(retry_after)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": message.encode()})


def bound_uploads(demo: gr.Blocks, limits: UploadLimits | None = None) -> UploadLimits:
    """Put `UploadGate` in front of the upload route of every server `demo.launch` starts from now
    on, with the per-file limit (max_file_size) set: Gradio builds its FastAPI app inside `launch`,
    so the gate goes in through launch's public `app_kwargs` (FastAPI's `middleware`). Returns the
    limits in force (their counts are shared by every launch of this demo)."""
    from starlette.middleware import Middleware

    limits = UploadLimits() if limits is None else limits
    launch = getattr(demo, "_dtrak_unbounded_launch", None) or demo.launch
    demo._dtrak_unbounded_launch = launch
    demo.upload_limits = limits

    def bounded_launch(*args, app_kwargs=None, max_file_size=None, **kwargs):
        app_kwargs = dict(app_kwargs or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(UploadGate, limits=demo.upload_limits)]
        return launch(*args, app_kwargs=app_kwargs, max_file_size=demo.upload_limits.max_file_bytes
                      if max_file_size is None else max_file_size, **kwargs)

    demo.launch = bounded_launch
    return limits


def configure(demo: gr.Blocks, per_session: int = MAX_PENDING_PER_SESSION,
              per_client: int = MAX_PENDING_PER_CLIENT, uploads: UploadLimits | None = None) -> gr.Blocks:
    """Queue and limits for serving `demo` to many visitors (also used by the tests' servers): the
    queue bounded per session and per address (`bound_queue_per_visitor`), uploads per address and
    the upload cache (`bound_uploads`; uploads: the limits, default from the DTRAK_UPLOAD_*
    environment variables).

    The visitor's address is decided by `client_address` alone, from DTRAK_TRUSTED_PROXIES: uvicorn's
    own X-Forwarded-For handling, which believes the header from any loopback peer by default, is
    turned off (FORWARDED_ALLOW_IPS, read when the server starts)."""
    os.environ["FORWARDED_ALLOW_IPS"] = ""
    demo.queue(max_size=64, default_concurrency_limit=2)
    _served.append(demo)
    bound_queue_per_visitor(demo._queue, per_session, per_client)
    bound_uploads(demo, uploads)
    return demo


_served: list = []  # every demo `configure` prepared, whose queues `running_event` reads


def running_event(request, fn_name: str):
    """The queue's record of this session's running request of the handler `fn_name` (None outside
    a server): Gradio marks it not alive when the visitor's stream closes, which no public API
    reports. The one place that reads the queue's private records; tests/test_serving.py fails when
    Gradio changes them."""
    session = getattr(request, "session_hash", None)
    if session is None:
        return None
    for demo in list(_served):
        queue = getattr(demo, "_queue", None)
        for events in list(getattr(queue, "active_jobs", None) or ()):
            for event in events or ():
                if event.session_hash == session and event.fn.name == fn_name:
                    return event
    return None
