"""Training: data, configuration, the loop and its checkpoints.

`qforge.train(cfg)` (this package, called) runs a whole training: qforge.train.run.run_training."""
import sys
import types


class _TrainPackage(types.ModuleType):
    def __call__(self, cfg, **kwargs):
        """Train per `cfg` (a TrainConfig): load, train, save the adapter; (result, summary)."""
        from .run import run_training
        return run_training(cfg, **kwargs)


sys.modules[__name__].__class__ = _TrainPackage
