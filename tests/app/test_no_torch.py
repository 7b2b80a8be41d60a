import subprocess
import sys


def test_the_api_never_imports_torch():
    # The API process validates job configs with the engine's config module, which must stay light.
    code = "import sys, app.main, app.jobs.service, workers.celery_app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
