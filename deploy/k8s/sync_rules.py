"""Writes base/prometheusrule.yaml from deploy/compose/prometheus/rules.yml (one source for the rules).

python3 deploy/k8s/sync_rules.py            # needs PyYAML
python3 deploy/k8s/sync_rules.py --check    # exit 1 if the file is not what it would write (tests/deploy runs it)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "compose" / "prometheus" / "rules.yml"
TARGET = HERE / "base" / "prometheusrule.yaml"
HEAD = (
    "# The rules of deploy/compose/prometheus/rules.yml for the Prometheus operator (same groups; a test\n"
    "# keeps them equal). Generated: edit rules.yml, then run\n"
    "#   python3 deploy/k8s/sync_rules.py\n"
    "# The release label: kube-prometheus-stack's Prometheus loads only the rules that carry it.\n"
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
        "metadata": {"name": "lcs-serve", "labels": {"release": "kube-prometheus-stack"}},
        "spec": {"groups": groups},
    }
    return HEAD + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is out of date")
    args = p.parse_args(argv)
    if args.check:
        if TARGET.read_text() != render():
            print(f"{TARGET} is not what {SOURCE} makes (edited by hand?); run python3 {__file__}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
