"""Print the README's parameter table from the node's own declarations (one source of truth).

Usage: ``.venv/bin/python scripts/param_table.py`` -- paste the output into README.md; a test
checks that README.md lists every declared parameter.
"""
import json

from ros2_cbpnet.node_parameters import DEFAULTS, PARAMETERS


def main() -> None:
    """Print a Markdown table: parameter, default, changeable at run time, meaning."""
    print('| parameter | default | at run time | meaning |')
    print('|---|---|---|---|')
    for name, spec in PARAMETERS.items():
        default = json.dumps(DEFAULTS[name], ensure_ascii=False)
        meaning = spec.description
        if spec.constraints:
            meaning += f' ({spec.constraints})'
        elif spec.low is not None:
            meaning += f' (range {spec.low:g}..{spec.high:g})'
        runtime = 'no (start only)' if spec.read_only else 'yes'
        print(f'| `{name}` | `{default}` | {runtime} | {meaning} |')


if __name__ == '__main__':
    main()
