"""Monitoring: TensorBoard + `metrics.jsonl` writer, sample videos as GIFs, progress bars."""
from megaflow.monitor.progress import progress
from megaflow.monitor.writer import METRICS_FILE, MetricsWriter, video_grid_gif

__all__ = ["METRICS_FILE", "MetricsWriter", "progress", "video_grid_gif"]
