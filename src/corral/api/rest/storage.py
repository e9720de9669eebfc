"""REST routes of storage: pools, volumes, images (with file upload and download), VM disks,
and the host-local storage endpoint that servers and the leader call on the host of a file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import httpx
from fastapi import Body, FastAPI, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from corral.api.rest import render
from corral.errors import Malformed, NotFound, Unavailable, ValidationFailed
from corral.service.storage import ImageService, PoolService, VolumeService

__all__ = ["UPLOAD_PATH", "add_storage_routes", "stream_local_file"]

UPLOAD_PATH = r"^/api/v1/images/[^/]+/files/[^/]+$"
"""Image file uploads stream past the API's body limit (the image service caps them)."""

NameParam = Annotated[str, Path(max_length=63, description="a DNS label")]
FileParam = Annotated[str, Path(max_length=16, description="disk, kernel or initrd")]
LocalStorage = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def stream_local_file(path: Any, chunk: int = 1024 * 1024) -> AsyncIterator[bytes]:
    import asyncio

    fh = await asyncio.to_thread(open, path, "rb")
    try:
        while data := await asyncio.to_thread(fh.read, chunk):
            yield data
    finally:
        fh.close()


def add_storage_routes(
    app: FastAPI,
    *,
    pools: PoolService,
    volumes: VolumeService,
    images: ImageService,
    local_storage: LocalStorage | None,
    accepted: Callable[[Any, Any, bool, float], Awaitable[JSONResponse]],
    meta: Callable[[str | None, str | None], Any],
) -> None:
    """Register the routes on ``app`` (before the generic ``/vms/{name}/{action}`` route)."""

    # -- pools --------------------------------------------------------------------------------

    @app.get("/api/v1/pools", tags=["storage"])
    async def list_pools() -> JSONResponse:
        items, revision = await pools.list()
        return render.listing(items, None, revision)

    @app.post("/api/v1/pools", tags=["storage"], status_code=201)
    async def create_pool(
        body: Annotated[
            dict[str, Any], Body(examples=[{"name": "nfs", "path": "/mnt/nfs", "shared": True}])
        ],
    ) -> JSONResponse:
        return render.one(await pools.create(body), 201)

    @app.get("/api/v1/pools/{name}", tags=["storage"])
    async def get_pool(name: NameParam) -> JSONResponse:
        return render.one(await pools.get(name))

    @app.delete("/api/v1/pools/{name}", tags=["storage"])
    async def delete_pool(name: NameParam) -> JSONResponse:
        return render.one(await pools.delete(name))

    # -- volumes ------------------------------------------------------------------------------

    @app.get("/api/v1/volumes", tags=["storage"])
    async def list_volumes(
        node: Annotated[str | None, Query(max_length=63)] = None,
        pool: Annotated[str | None, Query(max_length=63)] = None,
    ) -> JSONResponse:
        items, revision = await volumes.list(node=node, pool=pool)
        return render.listing(items, None, revision)

    @app.post("/api/v1/volumes", tags=["storage"], status_code=201)
    async def create_volume(
        body: Annotated[dict[str, Any], Body(examples=[{"name": "data-1", "size_gib": 1}])],
    ) -> JSONResponse:
        return render.one(await volumes.create(body), 201)

    @app.get("/api/v1/volumes/{name}", tags=["storage"])
    async def get_volume(name: NameParam) -> JSONResponse:
        return render.one(await volumes.get(name))

    @app.patch("/api/v1/volumes/{name}", tags=["storage"])
    async def patch_volume(
        name: NameParam, patch: Annotated[dict[str, Any], Body(examples=[{"size_gib": 4}])]
    ) -> JSONResponse:
        return render.one(await volumes.resize(name, patch))

    @app.delete("/api/v1/volumes/{name}", tags=["storage"], status_code=202)
    async def delete_volume(
        name: NameParam,
        wait: Annotated[bool, Query()] = False,
        timeout: Annotated[float, Query(gt=0, le=300)] = 60.0,
    ) -> JSONResponse:
        import asyncio

        volume = await volumes.delete(name)
        if wait:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while loop.time() < deadline:
                try:
                    volume = await volumes.get(name)
                except NotFound:
                    return JSONResponse({"deleted": name}, 200)
                await asyncio.sleep(0.2)
        return render.one(volume, 202)

    # -- VM disks -----------------------------------------------------------------------------

    @app.post("/api/v1/vms/{name}/disks", tags=["vms"], status_code=202)
    async def attach_disk(
        name: NameParam,
        body: Annotated[dict[str, Any], Body(examples=[{"volume": "data-1"}])],
        wait: Annotated[bool, Query()] = False,
        timeout: Annotated[float, Query(gt=0, le=300)] = 60.0,
    ) -> JSONResponse:
        volume = body.get("volume") if isinstance(body, dict) else None
        if not isinstance(volume, str) or set(body) != {"volume"}:
            raise ValidationFailed.one("volume", "required", 'the body is {"volume": NAME}')
        vm, task = await volumes.attach(name, volume, meta(None, None))
        return await accepted(vm, task, wait, timeout)

    @app.delete("/api/v1/vms/{name}/disks/{volume}", tags=["vms"], status_code=202)
    async def detach_disk(
        name: NameParam,
        volume: NameParam,
        wait: Annotated[bool, Query()] = False,
        timeout: Annotated[float, Query(gt=0, le=300)] = 60.0,
    ) -> JSONResponse:
        vm, task = await volumes.detach(name, volume, meta(None, None))
        return await accepted(vm, task, wait, timeout)

    # -- images -------------------------------------------------------------------------------

    @app.get("/api/v1/images", tags=["images"])
    async def list_images() -> JSONResponse:
        items, revision = await images.list()
        return render.listing(items, None, revision)

    @app.post("/api/v1/images", tags=["images"], status_code=201)
    async def create_image(
        body: Annotated[
            dict[str, Any],
            Body(examples=[{"name": "tiny", "boot": "direct-kernel", "cmdline": "console=ttyS0"}]),
        ],
    ) -> JSONResponse:
        image = await images.create(body)
        return render.one(image, 202 if image.status.state == "downloading" else 201)

    @app.get("/api/v1/images/{name}", tags=["images"])
    async def get_image(name: NameParam) -> JSONResponse:
        return render.one(await images.get(name))

    @app.delete("/api/v1/images/{name}", tags=["images"])
    async def delete_image(name: NameParam) -> JSONResponse:
        return render.one(await images.delete(name))

    @app.put("/api/v1/images/{name}/files/{file}", tags=["images"])
    async def upload_image_file(
        request: Request,
        name: NameParam,
        file: FileParam,
        sha256: Annotated[
            str | None, Header(alias="x-content-sha256", description="checked after upload")
        ] = None,
    ) -> JSONResponse:
        """The raw bytes of one file of the image (disk, kernel, initrd), streamed."""
        expect = None
        if sha256 is not None:
            expect = sha256.strip().lower()
            if len(expect) != 64 or any(c not in "0123456789abcdef" for c in expect):
                raise Malformed("X-Content-SHA256: must be 64 hexadecimal digits")
        image = await images.upload(name, file, request.stream(), expect_sha256=expect)
        return render.one(image)

    @app.get("/api/v1/images/{name}/files/{file}", tags=["images"])
    async def download_image_file(
        name: NameParam,
        file: FileParam,
        local: Annotated[bool, Query(description="this host's copy only (hosts use it)")] = False,
    ) -> Response:
        path, holder, address = await images.open_file(name, file)
        if path is not None:
            return StreamingResponse(stream_local_file(path), media_type="application/octet-stream")
        if local:
            raise NotFound(f"image {name!r}: its {file} is not on this host")
        url = f"{address.rstrip('/')}/api/v1/images/{name}/files/{file}"
        client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=120.0))
        try:
            resp = await client.send(
                client.build_request("GET", url, params={"local": "true"}), stream=True
            )
        except httpx.HTTPError as exc:
            await client.aclose()
            raise Unavailable(
                f"host {holder}, which holds image {name!r}'s {file}, did not answer: {exc}"
            ) from exc
        if resp.status_code != 200:
            await resp.aclose()
            await client.aclose()
            raise Unavailable(f"host {holder} answered {resp.status_code} for image {name!r}")

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_bytes():
                    yield chunk
            finally:
                await resp.aclose()
                await client.aclose()

        return StreamingResponse(relay(), media_type="application/octet-stream")

    # -- this host's storage ------------------------------------------------------------------

    @app.post("/api/v1/local/storage", tags=["hosts"], include_in_schema=False)
    async def host_storage(op: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        if local_storage is None:
            raise Unavailable("this host runs no node agent storage")
        return await local_storage(op)
