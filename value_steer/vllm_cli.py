"""``python -m value_steer.vllm_cli serve ...``: the documented launcher path (serving layer).

The launcher lives in :mod:`value_steer.serving.launcher`; this module keeps the public name stable.
"""

from value_steer.serving.launcher import main, prepare_argv

__all__ = ["main", "prepare_argv"]

if __name__ == "__main__":
    main()
