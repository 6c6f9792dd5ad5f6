"""A tenant's model inputs: the one its source feeds, constants, and state carried between runs.

Streaming models take more than a frame: silero-vad wants a sample rate constant
and its RNN state back from the previous run; LSTMs want ``h``/``c`` pairs. A
tenant declares each extra input once (``[tenants.inputs.NAME]``) and a
:class:`Feeder` builds the full input dict per inference, carries state from the
named output to the input after each run, and starts again from the initial value
when the source restarts (a new epoch), since state from another stream means nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from agent.errors import TenantError

ROLES = ("constant", "state")


@dataclass(frozen=True)
class InputFeed:
    name: str
    role: str  # "constant" or "state"
    value: tuple[float, ...] = (
        0.0,
    )  # the constant, or the state's initial value (one value fills the shape)
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    from_output: str = ""  # state: the output that becomes this input on the next run

    def initial(self) -> np.ndarray:
        values = np.asarray(self.value, dtype=np.dtype(self.dtype))
        if len(values) == 1:
            return np.full(self.shape, values[0], dtype=values.dtype)
        if int(np.prod(self.shape)) != len(values):
            raise TenantError(
                f"input {self.name!r}: {len(values)} values do not fill shape {list(self.shape)}"
            )
        return values.reshape(self.shape)


def check(feeds: Sequence[InputFeed], inputs: list[str], outputs: list[str], source_input: str) -> list[str]:
    """Problems with a tenant's feeds against a model's input and output names."""
    problems = []
    for feed in feeds:
        if feed.name not in inputs:
            problems.append(f"inputs.{feed.name}: the model has no input {feed.name!r} (it has {inputs})")
        if feed.role == "state" and feed.from_output not in outputs:
            problems.append(
                f"inputs.{feed.name}.from: the model has no output {feed.from_output!r} (it has {outputs})"
            )
        if feed.name == source_input:
            problems.append(f"inputs.{feed.name}: the source already feeds this input")
    fed = {f.name for f in feeds} | {source_input}
    missing = [name for name in inputs if name not in fed]
    if missing:
        problems.append(f"inputs {missing} are fed by nothing: declare them as constant or state")
    return problems


def source_input(feeds: Sequence[InputFeed], inputs: list[str], declared: str) -> str:
    """The input the tenant's source feeds: the declared one, else the first not declared as a feed."""
    if declared:
        return declared
    taken = {f.name for f in feeds}
    for name in inputs:
        if name not in taken:
            return name
    raise TenantError("every model input is a constant or state: nothing is left for the source")


class Feeder:
    """Builds one tenant's inputs and keeps its state; thread-safe (one lock per tenant)."""

    def __init__(self, feeds: Sequence[InputFeed]) -> None:
        self.feeds = tuple(feeds)
        self._lock = threading.Lock()
        self._epoch = -1
        self._state: dict[str, np.ndarray] = {}
        self._constants = {f.name: f.initial() for f in self.feeds if f.role == "constant"}

    @property
    def stateful(self) -> bool:
        return any(f.role == "state" for f in self.feeds)

    def run(
        self,
        source_name: str,
        array: np.ndarray,
        epoch: int,
        model: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on the tenant's full inputs. A stateful tenant's runs are serialised
        (the scheduler may hand one tenant two workers), since each run needs the state the
        previous one produced; a failed run leaves the state as it was."""
        if not self.stateful:
            return model({source_name: array, **self._constants})
        with self._lock:
            if epoch != self._epoch:
                self._epoch = epoch
                self._state = {f.name: f.initial() for f in self.feeds if f.role == "state"}
            outputs = model({source_name: array, **self._constants, **self._state})
            for feed in self.feeds:
                if feed.role == "state" and feed.from_output in outputs:
                    self._state[feed.name] = np.asarray(outputs[feed.from_output]).astype(
                        np.dtype(feed.dtype), copy=False
                    )
            return outputs
