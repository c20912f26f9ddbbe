"""A succeeded job's adapter, to its owner, as one zip: the PEFT folder the server loads
(adapter_config.json, adapter_model.safetensors, the tokenizer files the trainer saved), so that
`unzip` and `PeftModel.from_pretrained(base, folder)` or `qforge serve --adapter` use it as it is.

GET /v1/fine_tuning/jobs/{id}/adapter answers it; the route finds the job by owner first, so to
any other key the job (and its adapter) does not exist. Stored (not deflated): safetensors of
random-looking floats do not shrink, and storing keeps the zip's cost a file copy. The zip is
written while it is sent (nothing on disk).
"""
from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

from starlette.responses import StreamingResponse

from ..serve.api import APIError
from . import models as ft_models
from .store import JobStore

CHUNK = 1 << 20  # bytes read (and sent) at a time


class _Sink(io.RawIOBase):
    """An unseekable file the zip writer writes into; the bytes are taken out as they come (so the
    zip uses data descriptors and is built while it is sent: no temporary file, memory of a chunk)."""

    def __init__(self):
        self.buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.buffer += data
        return len(data)

    def take(self) -> bytes:
        data, self.buffer = bytes(self.buffer), bytearray()
        return data


def adapter_zip(folder: Path) -> Iterator[bytes]:
    """The bytes of a zip of every file of adapter `folder` (relative names, sorted), a chunk at a time."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            with open(path, "rb") as source, archive.open(path.relative_to(folder).as_posix(), "w",
                                                          force_zip64=True) as target:
                while chunk := source.read(CHUNK):
                    target.write(chunk)
                    yield sink.take()
            yield sink.take()
    yield sink.take()  # the central directory


def adapter_download(store: JobStore, job: dict) -> StreamingResponse:
    """The zip of `job`'s final adapter as a download named after the model; 409 while the job has
    no adapter yet (not succeeded), 404 when its adapter was deleted."""
    model = job["fine_tuned_model"]
    if job["status"] != "succeeded" or not model:
        raise APIError(409, f"job {job['id']} is {job['status']}: its adapter can be downloaded once it has "
                       "succeeded", param="id", code="adapter_not_ready")
    folder = ft_models.adapter_dir(store, job, model)
    if folder is None or not folder.is_dir():
        raise APIError(404, f"the adapter of {model} was deleted", param="id", code="adapter_not_found")
    filename = model.replace(":", "_") + "-adapter.zip"
    return StreamingResponse(adapter_zip(folder), media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})
