"""Images uploaded to the playground: read with a size cap while they arrive, decoded only as
PNG, JPEG, GIF, BMP or WebP, refused when their channels are not the model's (converting a
colour photo to gray, or the reverse, is the user's call), converted as `complete --image` and
`upscale --image` convert a file, and kept in memory under a random id, the latest
`MAX_UPLOADS` only, so that a page can name one when it asks for images."""

from __future__ import annotations

import io
import secrets
from collections import OrderedDict
from dataclasses import dataclass

import torch
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..config import ImageTransformerConfig
from ..errors import UserError
from ..images import check_channels, fit_image, open_image, upscale_input
from ..superres import upsample_nearest
from .server import limited_body

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000  # decoded RGBA that is 160 MB; larger photos are refused
MAX_UPLOADS = 32
UPLOAD_SECONDS = 120.0  # the whole body, at 42 KB/s or more
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
FIELD = "file"


class TooLarge(UserError):
    """Refused: the request body is over `MAX_UPLOAD_BYTES`."""

    status = 413

    def __init__(self) -> None:
        super().__init__(
            f"the upload is over the {MAX_UPLOAD_BYTES // 2**20} MB limit: send a smaller image "
            "(it is resized to the model's size anyway)"
        )


@dataclass(frozen=True)
class Upload:
    """An uploaded image converted for one page: `image` is what that page takes (complete:
    the model's shape [C, H, W]; upscale: the low-resolution input [C, h, w]), `truth` the
    image itself when an upscale upload had the output size, `note` how it was converted."""

    page: str
    image: torch.Tensor
    truth: torch.Tensor | None
    note: str

    def shown(self, scale: int) -> torch.Tensor:
        """What the page shows of it: the image, or the input (pixels repeated) and truth."""
        if self.page != "upscale":
            return self.image[None]
        parts = [upsample_nearest(self.image[None], scale)]
        return torch.cat(parts if self.truth is None else [*parts, self.truth[None]])


def convert(data: bytes, config: ImageTransformerConfig, page: str) -> Upload:
    """The upload for `page` of an image file's bytes, or a UserError that names the fix."""
    image = open_image(io.BytesIO(data), "the upload", FORMATS, MAX_UPLOAD_PIXELS)
    check_channels(image, config.image_shape[0], "the upload")
    given = f"a {image.width}x{image.height} image"
    if page == "upscale":
        low_res, truth = upscale_input(image, config)
        _, h, w = config.low_res_shape
        if truth is None:
            note = f"{given}, cropped and resized to the {h}x{w} input"
        else:
            note = f"{given} (the output size), area-downsampled to the {h}x{w} input"
        return Upload(page, low_res[0], None if truth is None else truth[0], note)
    _, h, w = config.image_shape
    note = f"{given}, centre-cropped and resized to {h}x{w}"
    return Upload(page, fit_image(image, config.image_shape), None, note)


class Uploads:
    """The latest `MAX_UPLOADS` uploads by id (used from the event loop only)."""

    def __init__(self, keep: int = MAX_UPLOADS) -> None:
        self.keep = keep
        self._kept: OrderedDict[str, Upload] = OrderedDict()

    def add(self, upload: Upload) -> str:
        key = secrets.token_urlsafe(12)
        self._kept[key] = upload
        while len(self._kept) > self.keep:
            self._kept.popitem(last=False)
        return key

    def get(self, key: str, page: str) -> Upload:
        upload = self._kept.get(key)
        if upload is None:
            raise UserError(
                f"that upload is not kept any more (the server keeps the last {self.keep}, in "
                "memory): upload the image again"
            )
        if upload.page != page:
            raise UserError(f"that upload was made for the {upload.page} page: upload it here")
        return upload


async def read_upload(request: Request) -> bytes:
    """The bytes of the request's multipart file field, refusing a body over
    `MAX_UPLOAD_BYTES` as soon as it says so or grows past it, and one that stalls or takes
    over `UPLOAD_SECONDS`."""
    capped = limited_body(request, MAX_UPLOAD_BYTES, TooLarge, UPLOAD_SECONDS)
    how = f"send the image as the file field {FIELD!r} of a multipart form"
    try:
        async with capped.form(max_files=1, max_fields=1) as form:
            file = form.get(FIELD)
            if not isinstance(file, UploadFile):
                raise UserError(how)
            return await file.read()
    except HTTPException as err:  # the form could not be parsed
        raise UserError(f"{how} ({err.detail})") from None


__all__ = ["MAX_UPLOAD_BYTES", "FORMATS", "TooLarge", "Upload", "Uploads", "convert", "read_upload"]
