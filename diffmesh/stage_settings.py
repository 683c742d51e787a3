"""Which settings each stage has, for the Helm chart.

A service refuses to start on a DIFFMESH_* variable it does not know, so the chart must render a
setting only into the stages that have it. The chart cannot import Python; it reads this table
from `files/stage-settings.json`, which is generated from the stages' config dataclasses:

    python -m diffmesh.stage_settings          # rewrite the file (and the schema's name list)
    python -m diffmesh.stage_settings --check  # exit 1 when either is stale (tests run this)

With it, a global `settings` entry (or `stageDefaults.settings`) applies to every stage that has
the setting, so a limit such as `max_size` is set once for the orchestrator and every stage that
enforces it; a name no stage has fails the render, and so does a stage setting the stage lacks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from diffmesh.runtime.config import ServerConfig
from diffmesh.stages import STAGES, StageSpec, StageTable

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "diffmesh"
TABLE_FILE = CHART / "files" / "stage-settings.json"
SCHEMA_FILE = CHART / "values.schema.json"
SHARED_DEFINITION = "sharedSettings"


def config_class(spec: StageSpec) -> type[ServerConfig]:
    """The stage's settings dataclass: the ServerConfig subclass its main module defines (the most
    derived one: the orchestrator builds its config class on a base class of settings)."""
    module = spec.main_module()
    found = [obj for obj in vars(module).values()
             if isinstance(obj, type) and dataclasses.is_dataclass(obj) and issubclass(obj, ServerConfig)
             and obj.__module__ == module.__name__]
    leaves = [cls for cls in found if not any(other is not cls and issubclass(other, cls) for other in found)]
    if len(leaves) != 1:
        raise LookupError(f"{spec.module}: expected one ServerConfig dataclass, found {[c.__name__ for c in found]}")
    return leaves[0]


def settings_by_stage(table: StageTable = STAGES) -> dict[str, list[str]]:
    return {spec.name: sorted(field.name for field in dataclasses.fields(config_class(spec))) for spec in table}


def table_text(table: StageTable = STAGES) -> str:
    return json.dumps(settings_by_stage(table), indent=2, sort_keys=True) + "\n"


def schema_text(table: StageTable = STAGES) -> str:
    """values.schema.json with sharedSettings' names set to every setting some stage has."""
    schema = json.loads(SCHEMA_FILE.read_text())
    names = sorted({name for names in settings_by_stage(table).values() for name in names})
    schema["definitions"][SHARED_DEFINITION]["propertyNames"] = {"enum": names}
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffmesh.stage_settings", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether the chart's files are current")
    args = parser.parse_args(argv)
    stale = [(path, text) for path, text in ((TABLE_FILE, table_text()), (SCHEMA_FILE, schema_text()))
             if not path.is_file() or path.read_text() != text]
    if args.check:
        for path, _ in stale:
            print(f"{path} is stale: run `python -m diffmesh.stage_settings`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
