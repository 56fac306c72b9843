"""The playground (`imagetransformer serve RUN`): a page to sample from a trained model, complete
a test image or an uploaded one, and upscale with a super-resolution model, watching each image
grow as it is generated.

Routes: `/` (the page), `/static/NAME` (its script and style), `/api/info` (the run's facts and
the pages that apply), `/api/test-image?index=&page=` (a test image as the page shows it, PNG),
`/api/upload?page=` (POST, multipart field `file`: the converted image's id and preview),
`/api/stream?page=&...` (one generation as server-sent events: `frame`s, then `done` or `error`;
closing it cancels the generation), `/api/jobs` (how many generations run). A refusal is JSON
`{"error": one line}` with the status that fits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..data import ImageDataset
from ..errors import UserError
from ..grid import grid_png
from ..layout import area_downsample
from ..model import ImageTransformer
from ..run import Run, check_data_fits
from ..runs_io import open_model, open_run
from ..sampling import can_guide, default_guidance
from ..superres import upsample_nearest
from . import tasks
from .events import EventStream
from .generation import Generation, Jobs, png_data_url
from .server import SecurityHeaders, asset_routes, page, quiet_disconnect
from .uploads import MAX_UPLOAD_BYTES, Uploads, convert, read_upload

_NO_STORE = {"Cache-Control": "no-store"}
MAX_JOBS = 4


def _refusal(message: str, status: int) -> JSONResponse:
    headers = {**_NO_STORE, **({"Connection": "close"} if status in (408, 413) else {})}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _user_error(request: Request, err: Exception) -> Response:
    return _refusal(str(err), getattr(err, "status", 400))


async def _http_error(request: Request, err: HTTPException) -> Response:
    return _refusal(str(err.detail), err.status_code)


def last_test_bits_per_dim(the_run: Run | None) -> float | None:
    """The latest test bits/dim in the run's log.jsonl, if it records one."""
    if the_run is None or not the_run.log_path.is_file():
        return None
    found = None
    for line in the_run.log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written by a training still running
            continue
        if record.get("kind") == "test" and "bits_per_dim" in record:
            found = float(record["bits_per_dim"])
    return found


def _test_split(model: ImageTransformer, the_run: Run | None) -> tuple[ImageDataset | None, str]:
    """The run's test images, or None and why there are none."""
    if the_run is None:
        return None, "this folder has no run.json, so no test images: upload one"
    try:
        dataset = the_run.load_split("test")
        check_data_fits(model.config, dataset, training=False)
    except UserError as err:
        return None, f"the test images cannot be read ({err}): upload one"
    return dataset, ""


def playground_app(run_dir: str | Path, device: torch.device) -> Starlette:
    """The ASGI app of the playground for the model of `run_dir` on `device`."""
    model = open_model(str(run_dir), device)
    config = model.config
    the_run = open_run(str(run_dir))
    test_set, no_test_set = _test_split(model, the_run)
    uploads = Uploads()
    jobs = Jobs(MAX_JOBS)
    facts = {
        "run": Path(run_dir).name,
        "preset": the_run.info.preset if the_run else None,
        "data": the_run.info.data if the_run else None,
        "image_shape": list(config.image_shape),
        "attention": config.attention,
        "output": config.output,
        "task": config.task,
        "scale": config.scale if config.task == "superres" else None,
        "low_res_shape": list(config.low_res_shape) if config.task == "superres" else None,
        "num_classes": config.num_classes,
        "guidance": default_guidance(model) if can_guide(model) else None,
        "max_guidance": tasks.MAX_GUIDANCE,
        "parameters": model.num_parameters(),
        "test_bits_per_dim": last_test_bits_per_dim(the_run),
        "test_images": len(test_set) if test_set is not None else 0,
        "no_test_images": no_test_set,
        "device": str(device),
        "pages": tasks.pages(model),
        "defaults": tasks.DEFAULTS,
        "max_n": tasks.MAX_N,
        "max_upload_mb": MAX_UPLOAD_BYTES // 2**20,
    }

    def test_image(params: Mapping[str, str]) -> tuple[torch.Tensor, int | None]:
        """Test image `index` [C, H, W] and its class (None when unlabelled)."""
        if test_set is None:
            raise UserError(no_test_set)
        if not params.get("index", "").strip():
            raise UserError(f"give index (a test image, 0 to {len(test_set) - 1}) or upload")
        index = tasks.integer(params, "index", 0, 0, len(test_set) - 1)
        images, labels = test_set.batch(torch.tensor([index]))
        return images[0], None if labels is None else int(labels[0])

    def page_input(params: Mapping[str, str], name: str) -> tuple[torch.Tensor, int | None]:
        """What page `name` works on, an upload (`upload=ID`) or a test image (`index=I`),
        converted for the page ([C, H, W], or the low-resolution input [C, h, w] to upscale),
        and its class when known."""
        key = params.get("upload", "")
        if key:
            return uploads.get(key, name).image, None
        image, label = test_image(params)
        if name == "upscale":
            return area_downsample(image[None], config.scale)[0], label
        return image, label

    def generation(params: Mapping[str, str]) -> Generation:
        name = params.get("page", "")
        tasks.check_page(model, name)  # before its input, so a page that does not apply says so
        if name == "sample":
            return tasks.sample(model, params)
        image, label = page_input(params, name)
        if name == "complete":
            return tasks.complete(model, params, image, label)
        return tasks.upscale(model, params, image)

    def info(request: Request) -> Response:
        return JSONResponse(facts, headers=_NO_STORE)

    def jobs_status(request: Request) -> Response:
        return JSONResponse(jobs.status(), headers=_NO_STORE)

    def test_image_png(request: Request) -> Response:
        image, _ = test_image(request.query_params)
        shown = image[None]
        if request.query_params.get("page") == "upscale" and config.task == "superres":
            low_res = area_downsample(shown, config.scale)
            shown = torch.cat([upsample_nearest(low_res, config.scale), shown])
        return Response(grid_png(shown), media_type="image/png", headers=_NO_STORE)

    async def upload(request: Request) -> Response:
        name = request.query_params.get("page", "")
        tasks.check_page(model, name)
        if name == "sample":
            raise UserError("the sample page takes no image: upload on the complete page")
        received = await run_in_threadpool(convert, await read_upload(request), config, name)
        key = uploads.add(received)
        preview = png_data_url(grid_png(received.shown(config.scale)))
        return JSONResponse(
            {"id": key, "preview": preview, "note": received.note}, headers=_NO_STORE
        )

    async def stream(request: Request) -> Response:
        return EventStream(jobs.start(generation(request.query_params)))

    app = Starlette(
        routes=[
            Route("/", page("playground.html"), methods=["GET"]),
            *asset_routes("playground"),
            Route("/api/info", info, methods=["GET"]),
            Route("/api/test-image", test_image_png, methods=["GET"]),
            Route("/api/upload", upload, methods=["POST"]),
            Route("/api/stream", stream, methods=["GET"]),
            Route("/api/jobs", jobs_status, methods=["GET"]),
        ],
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={
            UserError: _user_error,
            HTTPException: _http_error,
            ClientDisconnect: quiet_disconnect,
        },
    )
    app.state.jobs = jobs  # so that stopping the server can end the generations first
    return app


__all__ = ["last_test_bits_per_dim", "playground_app"]
