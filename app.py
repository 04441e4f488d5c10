"""Entry point: `python app.py` (what `make demo` and Hugging Face Spaces run).

Settings come from the environment: CHATTERBOX_WEIGHTS (auto, hub, local:DIR, random,
tiny), CHATTERBOX_DEVICE (auto, cuda, mps, cpu), CHATTERBOX_DEMO_CACHE, CHATTERBOX_API_KEY
(when set, the /v1 API needs it as a bearer token), CHATTERBOX_QUEUE_MAX,
CHATTERBOX_UPLOAD_TTL, and Gradio's own GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (default
127.0.0.1:7860). A bad weights source (or a local: folder that is not there), device,
cache folder, queue size, upload lifetime or port (or one in use) stops start-up with one
`error:` line naming the variable and exit status 2.
"""

import ctypes
import ctypes.util
import logging
import os
import socket
import sys
from functools import partial

from chatterbox_demo.config import parse_count


def weights_source(value: str) -> None:
    from chatterbox_demo.weights import parse_source

    kind, directory = parse_source(value)
    # Checked here, not at the first load: the page would start and fail on every use.
    if kind == "local" and not os.path.isdir(directory):
        raise ValueError(f"the weights folder {directory} does not exist or is not a folder")


def cache_folder(value: str) -> None:
    # A missing folder is made at the first save; a file in its place fails every save.
    if os.path.exists(value) and not os.path.isdir(value):
        raise ValueError(f"{value} is a file; name a folder (it is made when missing)")


def server_port(value: str) -> None:
    port = parse_count("GRADIO_SERVER_PORT", value, high=65535)
    # Given no port, Gradio takes the first free one from 7860; given this variable, it
    # moved on to the next free port just the same, so a proxy or script pointed at the
    # port the user chose found nothing there (or another program). Checked the way Gradio
    # checks, on the loopback address; SO_REUSEADDR so a server stopped a moment ago does
    # not count.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ValueError(f"port {port} is in use ({exc.strerror}); stop what uses it "
                             "or set another port") from None


def device(value: str) -> None:
    from chatterbox_demo.manager import pick_device

    pick_device(value)


# Environment variable -> check that raises ValueError saying what is wrong. The package
# reads CHATTERBOX_QUEUE_MAX and CHATTERBOX_UPLOAD_TTL, and Gradio GRADIO_SERVER_PORT, as
# the page's modules are imported: checked first, or the import is the traceback.
SETTINGS = {
    "CHATTERBOX_QUEUE_MAX": partial(parse_count, "CHATTERBOX_QUEUE_MAX"),
    "CHATTERBOX_UPLOAD_TTL": partial(parse_count, "CHATTERBOX_UPLOAD_TTL"),
    "GRADIO_SERVER_PORT": server_port,
    "CHATTERBOX_DEMO_CACHE": cache_folder,
    "CHATTERBOX_WEIGHTS": weights_source,
    "CHATTERBOX_DEVICE": device,
}


def check_environment() -> None:
    """Exit with status 2 and one line naming the first bad setting. Unchecked, a bad value
    surfaced as a traceback from deep inside an import, Gradio or the model manager (or,
    for a port past 65535, an abort), which hid which variable was wrong."""
    for name, check in SETTINGS.items():
        value = os.environ.get(name)
        if value is None:
            continue
        try:
            check(value)
        except ValueError as exc:
            message = str(exc)  # the number checks name the variable themselves
            if not message.startswith(name):
                message = f"{name}: {message}"
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own heap arena; a server whose requests
    run on a pool of worker threads then grows by an arena per thread (the soak test saw
    the resident size climb under load). Two arenas keep it flat. No-op off glibc."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).mallopt(-8, arenas)  # -8 is M_ARENA_MAX
        except (OSError, AttributeError):
            pass


check_environment()

# Imported only after the check: importing them reads the settings it checked.
from chatterbox_demo.api import build_router  # noqa: E402
from chatterbox_demo.ui import build_demo, launch  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

demo = build_demo()

if __name__ == "__main__":
    limit_malloc_arenas()
    port = os.environ.get("GRADIO_SERVER_PORT")
    # Passed on so that Gradio binds this port or fails, rather than taking the next one.
    launch(demo, routers=[build_router()], **({"server_port": int(port)} if port else {}))
