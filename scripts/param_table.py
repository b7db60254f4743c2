"""Print (or write into README.md) the parameter table from the node's own declarations.

Usage: ``.venv/bin/python scripts/param_table.py`` prints it;
``.venv/bin/python scripts/param_table.py --write README.md`` replaces the table in place (the
block that starts with its header row). A test checks that README.md lists every declared
parameter with its default.
"""
import argparse
import json
from typing import List

from ros2_cbpnet.ros.parameters import DEFAULTS, PARAMETERS

HEADER = '| parameter | default | at run time | meaning |'


def table() -> List[str]:
    """Markdown rows: parameter, default, changeable at run time, meaning."""
    rows = [HEADER, '|---|---|---|---|']
    for name, spec in PARAMETERS.items():
        default = json.dumps(DEFAULTS[name], ensure_ascii=False)
        meaning = spec.description
        if spec.constraints:
            meaning += f' ({spec.constraints})'
        elif spec.low is not None:
            meaning += f' (range {spec.low:g}..{spec.high:g})'
        runtime = 'no (start only)' if spec.read_only else 'yes'
        rows.append(f'| `{name}` | `{default}` | {runtime} | {meaning} |')
    return rows


def main() -> None:
    """Print the table, or write it over the one in a README."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--write', metavar='README', help='replace the table in this file')
    args = parser.parse_args()
    rows = table()
    if not args.write:
        print('\n'.join(rows))
        return
    with open(args.write, encoding='utf-8') as fh:
        lines = fh.read().split('\n')
    start = lines.index(HEADER)
    end = start
    while end < len(lines) and lines[end].startswith('|'):
        end += 1
    lines[start:end] = rows
    with open(args.write, 'w', encoding='utf-8') as fh:
        fh.write('\n'.join(lines))


if __name__ == '__main__':
    main()
