"""Files of ``deploy/`` that ship inside the package as ``tensorslm.deploy``: example configs and
policies, the demo's traces, the dashboard definition. The same path works in a checkout (an
editable install maps the folder) and from an installed wheel."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def shipped_file(relative: str) -> Path:
    """The path of ``deploy/<relative>`` as installed, e.g. ``shipped_file("policies/battery.yaml")``.

    Raises ``FileNotFoundError`` naming the path when the file is not part of the install."""
    path = Path(str(files("tensorslm.deploy").joinpath(relative)))
    if not path.is_file():
        raise FileNotFoundError(f"{relative} is not shipped with this install of tensorslm "
                                f"(looked for {path})")
    return path
