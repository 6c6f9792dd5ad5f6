"""Every error the controller raises on purpose.

::

    ControllerError
    ├── NotFoundError                    an id the operator named does not exist (HTTP 404)
    │   ├── ModelNotFound
    │   ├── DeviceNotFound
    │   ├── RolloutNotFound
    │   ├── ProfileNotFound
    │   ├── ArtifactNotFound
    │   ├── BaselineNotFound             a model version without a drift baseline yet
    │   ├── DatasetNotFound
    │   ├── PolicyNotFound
    │   ├── RetrainingRunNotFound
    │   ├── TokenNotFound                an operator token id that does not exist
    │   ├── GroupNotFound                a device group name that does not exist
    │   └── WindowNotFound               a maintenance window id that does not exist
    ├── ConflictError                    the thing already exists (HTTP 409)
    │   ├── VersionExists
    │   ├── DeviceExists
    │   ├── RolloutConflict              a device and tenant already in another active rollout
    │   ├── CommandRefused               an operator command the rollout's state does not allow
    │   ├── GroupExists                  a device group of that name exists already
    │   └── DeviceRevoked                a revoked device gets no certificate (its id stays taken)
    ├── InvalidInputError                bad input, nothing was changed (HTTP 422)
    │   ├── InvalidModel                 onnx.checker / onnxruntime refused the file
    │   ├── InvalidDeviceId
    │   ├── InvalidProfile               a device profile that does not follow the schema (names the line)
    │   ├── UnknownTargets               a rollout names devices or versions that do not exist
    │   ├── InvalidDriftInput            a sketch, bin edges or reference data set that cannot be used
    │   ├── InvalidDataset               a capture upload or label file that does not hold together
    │   ├── InvalidPolicy                a retraining policy with a bad condition, trigger or cooldown
    │   ├── InvalidPublicKey             a device public key (or validity) a certificate cannot be issued for
    │   ├── InvalidTokenRequest          an operator token with an unknown role, a bad name or lifetime
    │   ├── InvalidGroup                 a group with a bad name, an unknown device or profile, a bad query
    │   ├── InvalidTenantSpec            a tenant spec with a bad field, or one its model's signature refutes
    │   └── InvalidWindow                a maintenance window with a bad cron, time zone or duration
    ├── TooLargeError                    an upload over the configured limit (HTTP 413)
    ├── ConfigError                      controller.toml missing or invalid (fatal at start)
    │   ├── AlreadyInitialised
    │   ├── SigningKeyError              the controller's Ed25519 key is missing or unreadable
    │   └── CertificateError             the controller's CA (DATA/ca/) is unreadable or inconsistent
    ├── StoreError                       the database failed underneath us (HTTP 500)
    │   ├── DuplicateKeyError            a unique key was violated (callers raise a ConflictError)
    │   └── DatabaseUnavailable          the database cannot be reached for now (HTTP 503; ingest waits)
    ├── BrokerAuthError                  the password file or the reload command failed (HTTP 503)
    ├── OptimizeError                    a variant could not be produced (kept as the variant's reason)
    └── TriggerError                     a retraining trigger failed after its retries (kept on the run)

Third-party errors (SQLAlchemy and its drivers, onnx, onnxruntime, paho, subprocess) are translated
into these at the module that calls the library; nothing above that module sees
them.
"""

from __future__ import annotations


class ControllerError(Exception):
    """Base of every deliberate controller error; ``str(exc)`` is the operator's message."""


class NotFoundError(ControllerError):
    pass


class ModelNotFound(NotFoundError):
    pass


class DeviceNotFound(NotFoundError):
    pass


class RolloutNotFound(NotFoundError):
    pass


class ArtifactNotFound(NotFoundError):
    pass


class ProfileNotFound(NotFoundError):
    pass


class ConflictError(ControllerError):
    pass


class VersionExists(ConflictError):
    pass


class DeviceExists(ConflictError):
    pass


class RolloutConflict(ConflictError):
    pass


class CommandRefused(ConflictError):
    pass


class DeviceRevoked(ConflictError):
    pass


class InvalidInputError(ControllerError):
    pass


class InvalidModel(InvalidInputError):
    pass


class InvalidTenantSpec(InvalidInputError):
    pass


class InvalidDeviceId(InvalidInputError):
    pass


class InvalidProfile(InvalidInputError):
    pass


class UnknownTargets(InvalidInputError):
    pass


class TooLargeError(ControllerError):
    pass


class ConfigError(ControllerError):
    pass


class AlreadyInitialised(ConfigError):
    pass


class SigningKeyError(ConfigError):
    pass


class CertificateError(ConfigError):
    pass


class StoreError(ControllerError):
    pass


class DuplicateKeyError(StoreError):
    pass


class DatabaseUnavailable(StoreError):
    pass


class BrokerAuthError(ControllerError):
    pass


class OptimizeError(ControllerError):
    pass


class BaselineNotFound(NotFoundError):
    pass


class DatasetNotFound(NotFoundError):
    pass


class PolicyNotFound(NotFoundError):
    pass


class RetrainingRunNotFound(NotFoundError):
    pass


class InvalidDriftInput(InvalidInputError):
    pass


class InvalidDataset(InvalidInputError):
    pass


class InvalidPolicy(InvalidInputError):
    pass


class InvalidPublicKey(InvalidInputError):
    pass


class TriggerError(ControllerError):
    pass


class TokenNotFound(NotFoundError):
    pass


class InvalidTokenRequest(InvalidInputError):
    pass


class GroupNotFound(NotFoundError):
    pass


class GroupExists(ConflictError):
    pass


class InvalidGroup(InvalidInputError):
    pass


class WindowNotFound(NotFoundError):
    pass


class InvalidWindow(InvalidInputError):
    pass
