"""How the package is layered: the web app and the command line both stand on the library, and
neither copies the other's settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("starlette")


def test_the_web_app_does_not_import_the_command_line() -> None:
    """Importing every web module (the playground, the study, their tasks) loads no verb."""
    code = (
        "import sys\n"
        "import imagetransformer.web, imagetransformer.web.playground, imagetransformer.web.study\n"
        "import imagetransformer.web.tasks, imagetransformer.web.server\n"
        "print(sorted(m for m in sys.modules if m.startswith('imagetransformer.cli')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("verb", ["sample", "complete", "upscale"])
def test_each_page_takes_its_verbs_defaults(verb) -> None:
    """What a playground page draws when not told is what its verb draws when not told."""
    from imagetransformer.cli import build_parser
    from imagetransformer.web.tasks import DEFAULTS

    extra = [] if verb == "sample" else ["--image", "x.png"]
    args = vars(build_parser().parse_args([verb, "RUN", *extra]))
    assert DEFAULTS[verb] == {name: args[name] for name in DEFAULTS[verb]}
    assert {"n", "temperature"} <= set(DEFAULTS[verb])
    assert ("keep" in DEFAULTS[verb]) == (verb == "complete")
