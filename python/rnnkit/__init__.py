from rnnkit._core import get_num_threads, set_num_threads, simd_level
__all__ = ["get_num_threads", "set_num_threads", "simd_level"]
