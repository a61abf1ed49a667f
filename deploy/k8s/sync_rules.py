"""Writes base/prometheusrule.yaml from deploy/compose/prometheus/rules.yml (one source for the rules).

python3 deploy/k8s/sync_rules.py        # needs PyYAML; tests/deploy checks the two are in sync
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "compose" / "prometheus" / "rules.yml"
TARGET = HERE / "base" / "prometheusrule.yaml"
HEAD = (
    "# The rules of deploy/compose/prometheus/rules.yml for the Prometheus operator (same groups; a test\n"
    "# keeps them equal). Generated: edit rules.yml, then run\n"
    "#   python3 deploy/k8s/sync_rules.py\n"
)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(SOURCE.read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "lcs-serve"},
        "spec": {"groups": groups},
    }
    return HEAD + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=110)


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
