"""Studies that sweep the compiler stages to measure claims (accuracy–throughput frontiers, search time)."""

from bitmix.study.frontier import StudyConfig, default_config, render_results, run_frontier

__all__ = ["StudyConfig", "default_config", "render_results", "run_frontier"]
