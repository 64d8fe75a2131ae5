"""Exponential moving average of model weights (`ema: {enable: true, decay: 0.9999}`).

After every optimizer update: ema = decay * ema + (1 - decay) * weight for floating-point
parameters and buffers; integer buffers are copied. The average is kept in float32 whatever
the training dtype. `swapped(model)` evaluates with the averaged weights and puts the trained
ones back afterwards.
"""
import contextlib
import numbers

import paddle

from ..registry import ConfigError

__all__ = ["ModelEMA"]


class ModelEMA:
    def __init__(self, model, decay=0.9999):
        if not (isinstance(decay, numbers.Real) and not isinstance(decay, bool) and 0.0 <= decay < 1.0):
            raise ConfigError(f"ema.decay: expected a number in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.shadow = {}
        with paddle.no_grad():
            for name, value in model.state_dict().items():
                self.shadow[name] = value.astype("float32").clone() if paddle.is_floating_point(value) \
                    else value.clone()
        for v in self.shadow.values():
            v.stop_gradient = True

    @paddle.no_grad()
    def update(self, model):
        d = self.decay
        for name, value in model.state_dict().items():
            avg = self.shadow[name]
            if paddle.is_floating_point(value):
                avg.scale_(d)
                avg.add_(value.astype("float32") * (1.0 - d))
            else:
                paddle.assign(value, avg)

    def state_dict(self):
        return dict(self.shadow)

    def set_state_dict(self, state, source="checkpoint"):
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"{source}: EMA weights lack {', '.join(missing[:5])}")
        for name, avg in self.shadow.items():
            value = paddle.to_tensor(state[name])
            if list(value.shape) != list(avg.shape):
                raise ValueError(f"{source}: EMA weight '{name}' has shape {list(value.shape)}, expected "
                                 f"{list(avg.shape)}")
            paddle.assign(value.astype(avg.dtype), avg)

    @contextlib.contextmanager
    def swapped(self, model):
        """Inside the block `model` holds the EMA weights; its own weights come back after."""
        with paddle.no_grad():
            backup = {k: v.clone() for k, v in model.state_dict().items()}
            model.set_state_dict({k: v.astype(backup[k].dtype) for k, v in self.shadow.items()})
        try:
            yield model
        finally:
            with paddle.no_grad():
                model.set_state_dict(backup)
