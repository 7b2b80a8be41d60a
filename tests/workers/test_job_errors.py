"""One error tree: every error a job can end with is a `GattError` with a stable code."""

import pytest

from gatt.errors import GattError, Problem, ValidationFailed
from gatt.masks import TemplateError
from service.storage import StoreError
from workers.engine.models import ModelError
from workers.engine.pipeline import NoAcceptedSamples
from workers.tasks import JobFailure, error_of


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (
            ValidationFailed("job config", [Problem("unknown_field", "unknown field 'x'", "x")]),
            "invalid_input",
        ),
        (TemplateError("no exact span"), "chat_template"),
        (ModelError("no_chat_template", "the model has no chat template"), "model_no_chat_template"),
        (NoAcceptedSamples("nothing passed"), "no_accepted_samples"),
        (JobFailure("corpus_deleted", "The job's corpus was deleted."), "corpus_deleted"),
    ],
)
def test_each_engine_error_ends_a_job_with_its_code_and_message(exc, code):
    assert isinstance(exc, GattError)
    assert error_of(exc) == (code, str(exc))


def test_other_failures_keep_their_codes():
    assert error_of(StoreError("bucket gone"))[0] == "artifact_store"
    assert error_of(MemoryError())[0] == "out_of_memory"
    assert error_of(KeyError("x")) == ("internal_error", "KeyError: 'x'")
