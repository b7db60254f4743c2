"""``cbpnet-bench``: performance figures of ros2_cbpnet as JSON, with a readable table.

Modules, by concern:

- :mod:`.cli`: arguments, the run, JSON and table output (``main``).
- :mod:`.model_figures`: backbone, prediction and learning throughput against their floors.
- :mod:`.scaling`: costs that must not grow with the number of learned tasks.
- :mod:`.node_figures` and :mod:`.node_profile`: ``cbpnet_node`` over real DDS, cameras raw
  and JPEG, and where the node's time goes (py-spy).
- :mod:`.memory`, :mod:`.machine`, :mod:`.timing`: measurement helpers.
- :mod:`.report`: the targets and the table.

What is measured (design.md section 3, "Performance model"):

- ``backbone_ips``: the bare frozen backbone (timm ``forward_features`` + pre-logits pooling,
  ``torch.inference_mode``, the run's autocast), images/s at batch 1 and 8.
- ``inference_ips``: the full prediction from uint8 480x640 RGB frames through
  ``ContinualLearner.predict`` with 2 learned tasks (the query pass is needed);
  ``inference_ips_one_task``: the same with one task (the query pass is skipped).
- ``inference_floor_ratio`` = inference_ips / (backbone_ips / 2): the floor of a prediction is
  two backbone passes, so 1.0 means "everything around the two passes is free".
- ``train_ips``: images x epochs per second of ``learn_task`` (only the call is timed) of a
  ``--train-images`` task learned as the 2nd task, and as ``*_first_task`` as the first.
  ``train_floor_ips``: one no-grad query pass + one prompted forward + backward on a training
  batch; ``train_floor_ratio`` = train_ips / train_floor_ips.
- ``tasks_scaling_2_50``: prediction at batch 8 with N (default 50) learned tasks over 2,
  paired in the same rounds; ``learn_time_ratio_50_2``: ``learn_task`` of the Nth task over
  the 2nd, same task, paired; ``checkpoint_growth`` (bytes per task from 2 to N) and
  ``memory_tasks`` (this process's RSS after N tasks over after 2). All N-task learners are
  built with ``learn_task`` on small synthetic tasks.
- ``memory``: peak resident memory per phase; on CUDA ``cuda_peak_mb`` per timed item
  (``torch.cuda.max_memory_allocated``, reset before each item).
- ``node_cameras``: ``cbpnet_node`` as a subprocess, taught one task through its topics and
  service, fed 640x480 cameras at 30 Hz each (1 raw, 4 raw, 4 JPEG by default): the fraction
  of offered frames classified and the stamp-to-prediction latency per camera;
  ``four_camera_classified_fraction`` (raw, compressed) and ``node_vs_model`` summarise them.
- ``gpu`` (CUDA runs): the GPU figures in one place.
- ``--compare-naive``: the model figures again with ``fast_paths=False``.

Every throughput figure is the median of ``--repeats`` timed rounds after a warm-up. Within a
round the timed items take turns in ~0.1 s sub-slices, and every ratio is the median of the
per-round ratios, so load from other processes hits numerator and denominator alike. On CUDA
every timed call ends with ``torch.cuda.synchronize``. ``spread`` gives (max - min) / median
over the rounds of each figure, and ``machine.other_processes_cores_busy`` how much CPU
everything else used meanwhile. On a shared CPU machine prefer ``--threads 1``.
"""
from .cli import build_parser, main, run_bench
from .timing import synthetic_frame, synthetic_task
from .report import format_table, targets

__all__ = ['build_parser', 'format_table', 'main', 'run_bench', 'synthetic_frame',
           'synthetic_task', 'targets']
