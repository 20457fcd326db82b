"""``python -m value_steer.vllm_cli serve ...``: ``vllm serve`` where vLLM is the CPU build (serving layer).

The launcher lives in :mod:`value_steer.serving.launcher`; this module keeps the public name stable.
"""

from value_steer.serving.launcher import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
