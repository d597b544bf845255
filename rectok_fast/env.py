"""``python -m rectok_fast.env``: print :func:`rectok_fast.build_info` as JSON."""

import json

from rectok_fast import build_info

if __name__ == "__main__":
    print(json.dumps(build_info(), indent=2, default=str))
