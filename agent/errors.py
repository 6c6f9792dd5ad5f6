"""Every error the agent raises on purpose, in one hierarchy.

::

    AgentError                      base; ``fatal`` says whether retrying can help
    ├── ConfigError                 agent.toml is missing, unreadable or invalid (fatal)
    ├── StateError                  the persisted device state cannot be read or written
    ├── DiskFull                    a write refused for want of space (ENOSPC, EDQUOT): transient,
    │                               the work waits until free space is back
    ├── ArtifactError               an artifact transfer went wrong
    │   ├── ManifestError           the manifest does not fit what was asked (fatal)
    │   ├── ChunkRejected           a chunk failed its sha256 or range check (transient:
    │   │   │                       the chunk is requested again)
    │   │   └── SealRejected        a wave broadcast's chunk or manifest whose AES-GCM tag
    │   │                           fails: corrupted, or replayed from another chunk or artifact
    │   ├── DigestMismatch          the assembled file's sha256 is not the digest (fatal)
    │   └── RemoteArtifactError     the controller answered ArtifactError (fatal)
    ├── ModelError                  running models
    │   ├── ModelLoadError          a model file the backend cannot load or serve (fatal)
    │   ├── UnsupportedRuntime      no backend for the requested runtime (fatal)
    │   ├── MemoryBudgetExceeded    loading would exceed the model memory budget (fatal)
    │   └── InferenceError          a run failed inside the backend
    │       ├── InvalidInput        the caller's tensors do not fit the model
    │       └── Overloaded          the tenant's queue was full, the call dropped (transient)
    ├── TensorCodecError            a wire Tensor that is not a valid numpy array
    ├── CallRefused                 a local app's call refused before any model ran
    │   ├── Unauthenticated         no token where the tenant needs one, or a token no tenant has
    │   ├── PermissionDenied        another tenant's token, or a shadow candidate named
    │   ├── UnknownTenant           no such tenant on this device
    │   ├── NotReady                the tenant's model is assigned but not loaded yet
    │   └── RegionRefused           a shared-memory region, offset or size outside what the
    │                               tenant registered; nothing was read or written
    ├── TenantError                 a tenant declaration that cannot be used (fatal)
    ├── SourceError                 a sensor source failed or ended (transient: reopened with backoff)
    ├── PreprocessError             a sample the tenant's preprocessing cannot shape (transient)
    ├── OutboxError                 the on-disk outbox (sqlite) failed
    └── InstallError                ``edgefleet-agent install`` cannot install this device (fatal)
        └── BundleRefused           the provisioning bundle is corrupt, for another device or
                                    incomplete; nothing was changed

Third-party errors (onnxruntime, sqlite3, paho, OSError) are translated into these
at the module boundary that sees them, so callers catch one family. A fatal error
on an artifact is reported to the controller with the message as the reason.
"""

from __future__ import annotations


class AgentError(Exception):
    fatal = False


class ConfigError(AgentError):
    fatal = True


class StateError(AgentError):
    fatal = True


class DiskFull(AgentError):
    """A write the disk refused for want of space or quota; retried once space is back."""

    fatal = False


class ArtifactError(AgentError):
    fatal = True


class ManifestError(ArtifactError):
    fatal = True


class ChunkRejected(ArtifactError):
    fatal = False


class SealRejected(ChunkRejected):
    pass


class DigestMismatch(ArtifactError):
    fatal = True


class RemoteArtifactError(ArtifactError):
    fatal = True


class ModelError(AgentError):
    fatal = True


class ModelLoadError(ModelError):
    fatal = True


class UnsupportedRuntime(ModelError):
    fatal = True


class InferenceError(ModelError):
    fatal = False


class InvalidInput(InferenceError):
    fatal = False


class TensorCodecError(AgentError):
    fatal = False


class OutboxError(AgentError):
    fatal = False


class CallRefused(AgentError):
    """A local app's call (gRPC or shared memory) refused before any model ran."""

    fatal = False


class Unauthenticated(CallRefused):
    pass


class PermissionDenied(CallRefused):
    pass


class UnknownTenant(CallRefused):
    pass


class NotReady(CallRefused):
    pass


class RegionRefused(CallRefused):
    """A shared-memory request naming a region, offset or size the tenant did not register."""


class TenantError(AgentError):
    """A tenant declaration (config or desired state) that cannot be used."""

    fatal = True


class SourceError(AgentError):
    """A sensor source that cannot be opened or stopped delivering (retried with backoff)."""

    fatal = False


class PreprocessError(AgentError):
    """A sample that the tenant's preprocessing cannot turn into the model's input."""

    fatal = False


class MemoryBudgetExceeded(ModelError):
    """Loading the model would take the pool over the device's memory budget."""

    fatal = True


class Overloaded(InferenceError):
    """The tenant's scheduler queue was full or stopping: the call was not run (try again)."""

    fatal = False


class InstallError(AgentError):
    fatal = True


class BundleRefused(InstallError):
    pass
