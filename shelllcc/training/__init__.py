"""The one training stack every experiment uses: the train state and its guarded update (``train_state``),
the step (``step``: loss -> gradients, microbatches), the loop (``loop``: metrics, progress, checkpoints,
SIGTERM), orbax checkpoints with exact resume (``checkpoints``), optimizers from a config (``optimizers``),
LoRA adapters (``lora``), metric writers without TensorFlow (``metric_writers``) and multi-process start-up
(``distributed``)."""
