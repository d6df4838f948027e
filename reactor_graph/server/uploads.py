"""File uploads, as the Reactor JS SDK 2.9.0's `reactor.uploadFile(file)` makes them in local mode:

  1. `POST /sessions/{id}/uploads` `{name, size, mime_type}` -> `{presigned_id, presigned_url, path}`
  2. `PUT presigned_url` with the file's bytes (Content-Length = size)
  3. runtime `fileUploaded` `{upload_id, name, mime_type, size}` on the data channel
  4. `sendCommand(cmd, {param: fileRef})`: the SDK moves FileRef values into the message's `uploads`
     section, `{param: {upload_id, name, mime_type, size}}`, which the server resolves here into the
     decoded image a command param of type `image` takes.

Everything about an upload is untrusted: the declared type must be an image type this server decodes
(PNG, JPEG, WebP, GIF, BMP), the size at most `max_file_bytes` (10 MB) and what arrives exactly the declared
size; the bytes must start like an image and its header must not claim more than 4096 x 4096 pixels
(checked before decoding: a decompression bomb is refused unread). At most `max_files` uploads and
`max_session_bytes` per session. Upload ids are 128 random bits and valid only within their own session;
the files live in a private directory of that session, deleted when the session ends. Nothing a client
sends becomes part of a path.
"""
from __future__ import annotations

import asyncio
import io
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from ..inputs import IMAGE_TYPES, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, ImageError, Picture, decode_image

log = logging.getLogger("reactor_graph.server")

MAGIC = {"PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",), "GIF": (b"GIF87a", b"GIF89a"),
         "BMP": (b"BM",), "WEBP": (b"RIFF",)}


class UploadError(Exception):
    """Refused; `status` is the HTTP status, the message is for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    id: str
    name: str
    mime_type: str
    size: int
    path: str
    complete: bool = False
    picture: Picture | None = None


@dataclass
class SessionUploads:
    dir: str
    files: dict[str, Upload] = field(default_factory=dict)
    bytes: int = 0


class UploadStore:
    def __init__(self, max_file_bytes: int = MAX_IMAGE_BYTES, max_files: int = 8,
                 max_session_bytes: int = 32 * 1024 * 1024, max_pixels: int = MAX_IMAGE_PIXELS):
        self.max_file_bytes, self.max_files = max_file_bytes, max_files
        self.max_session_bytes, self.max_pixels = max_session_bytes, max_pixels
        self._root: str | None = None
        self.sessions: dict[str, SessionUploads] = {}

    # -- 1. allocate ----------------------------------------------------------------------------------------
    def create(self, session_id: str, body: Any) -> Upload:
        if not isinstance(body, dict):
            raise UploadError(400, "the body must be JSON: {name, size, mime_type}")
        name, size, mime = body.get("name"), body.get("size"), body.get("mime_type")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise UploadError(400, "'size' must be the file's size in bytes (a positive integer)")
        if not isinstance(mime, str) or mime.split(";")[0].strip().lower() not in IMAGE_TYPES:
            raise UploadError(415, f"this server takes image uploads only ({', '.join(IMAGE_TYPES)}); got "
                                   f"{str(mime)[:60]!r}")
        if size > self.max_file_bytes:
            raise UploadError(413, f"the file is {size} bytes; at most {self.max_file_bytes} are accepted")
        s = self._session(session_id)
        if len(s.files) >= self.max_files:
            raise UploadError(429, f"at most {self.max_files} uploads per session")
        if s.bytes + size > self.max_session_bytes:
            raise UploadError(413, f"this session's uploads would exceed {self.max_session_bytes} bytes")
        uid = secrets.token_urlsafe(16)
        up = Upload(uid, str(name or "upload")[:200], mime.split(";")[0].strip().lower(), size,
                    os.path.join(s.dir, f"{len(s.files):02d}.bin"))
        s.files[uid] = up
        s.bytes += size
        return up

    def _session(self, session_id: str) -> SessionUploads:
        s = self.sessions.get(session_id)
        if s is None:
            if self._root is None:
                self._root = tempfile.mkdtemp(prefix="reactor-graph-uploads-")
            d = os.path.join(self._root, f"s{len(os.listdir(self._root)):04d}-{secrets.token_hex(4)}")
            os.mkdir(d, 0o700)
            s = self.sessions[session_id] = SessionUploads(d)
        return s

    def get(self, session_id: str, upload_id: Any) -> Upload:
        s = self.sessions.get(session_id)
        up = s.files.get(upload_id) if s is not None and isinstance(upload_id, str) else None
        if up is None:
            raise UploadError(404, "no such upload in this session")
        return up

    # -- 2. receive -----------------------------------------------------------------------------------------
    async def receive(self, session_id: str, upload_id: str, content: Any, length: int | None) -> Upload:
        """Read the PUT body (an aiohttp StreamReader) into the upload's file, refusing what does not fit."""
        up = self.get(session_id, upload_id)
        if up.complete:
            raise UploadError(409, "this upload has already been received")
        if length is not None and length != up.size:
            raise UploadError(400, f"the body is {length} bytes but the upload was declared as {up.size}")
        data = bytearray()
        while True:
            chunk = await content.read(64 * 1024)
            if not chunk:
                break
            data += chunk
            if len(data) > up.size:
                raise UploadError(413, f"the body is larger than the declared {up.size} bytes")
        if len(data) != up.size:
            raise UploadError(400, f"the body is {len(data)} bytes but the upload was declared as {up.size}")
        self.check_header(bytes(data), up)
        try:
            fd = os.open(up.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # two PUTs of one upload at once: the first wins
            raise UploadError(409, "this upload has already been received") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        up.complete = True
        return up

    def put(self, session_id: str, upload_id: str, name: str, mime_type: str, data: bytes) -> Upload:
        """An upload another replica received for the client this session stands for (scale/relay.py): kept
        under the same id, so the client's FileRefs name it here too; the same limits and checks."""
        if not isinstance(upload_id, str) or not upload_id or len(upload_id) > 64 or \
                not all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in upload_id):
            raise UploadError(400, "not an upload id")
        up = self.create(session_id, {"name": name, "size": len(data), "mime_type": mime_type})
        s = self.sessions[session_id]
        del s.files[up.id]
        if upload_id in s.files:
            s.bytes -= up.size
            return s.files[upload_id]
        up.id = upload_id
        s.files[upload_id] = up
        try:
            self.check_header(data, up)
        except UploadError:
            del s.files[upload_id]
            s.bytes -= up.size
            raise
        with open(up.path, "xb") as f:
            f.write(data)
        up.complete = True
        return up

    def check_header(self, data: bytes, up: Upload) -> None:
        """Cheap checks before the bytes are kept: an image signature, and a header within the pixel limit."""
        from PIL import Image

        if not any(data.startswith(m) for ms in MAGIC.values() for m in ms) or \
                (data.startswith(b"RIFF") and data[8:12] != b"WEBP"):
            raise UploadError(415, f"{up.name[:60]!r} is not a PNG, JPEG, WebP, GIF or BMP image")
        try:
            with Image.open(io.BytesIO(data), formats=list(dict.fromkeys(IMAGE_TYPES.values()))) as im:
                w, h = im.size
        except Image.DecompressionBombError:
            raise UploadError(413, f"{up.name[:60]!r} has too many pixels") from None
        except Exception:  # noqa: BLE001 - anything the header parser refuses
            raise UploadError(415, f"{up.name[:60]!r} is not a readable image") from None
        if w * h > self.max_pixels:
            raise UploadError(413, f"{up.name[:60]!r} is {w}x{h} pixels; at most {self.max_pixels} are accepted")

    # -- 4. use -------------------------------------------------------------------------------------------------
    def picture(self, session_id: str, ref: Any) -> Picture:
        """A FileRef from a command's `uploads` section -> the decoded image (raises ImageError)."""
        upload_id = ref.get("upload_id") if isinstance(ref, dict) else None
        try:
            up = self.get(session_id, upload_id)
        except UploadError:
            raise ImageError("the upload it names is not one of this session's (upload it with "
                             "reactor.uploadFile first)") from None
        if not up.complete:
            raise ImageError(f"the upload {up.name[:60]!r} has not been received yet")
        if up.picture is None:
            with open(up.path, "rb") as f:
                up.picture = decode_image(f.read(), repr(up.name[:60]), self.max_file_bytes, self.max_pixels)
        return up.picture

    async def resolve(self, session_id: str, data: Any, uploads: Any) -> dict:
        """A command's params with its `uploads` section merged in as decoded images (in a worker thread)."""
        if not isinstance(uploads, dict):
            raise ImageError("'uploads' must map parameter names to FileRefs")
        params = dict(data) if isinstance(data, dict) else {}
        for key, ref in list(uploads.items())[:8]:
            params[str(key)[:100]] = await asyncio.to_thread(self.picture, session_id, ref)
        return params

    # -- the end ------------------------------------------------------------------------------------------------
    def drop(self, session_id: str) -> None:
        s = self.sessions.pop(session_id, None)
        if s is not None:
            shutil.rmtree(s.dir, ignore_errors=True)

    def close(self) -> None:
        for sid in list(self.sessions):
            self.drop(sid)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
