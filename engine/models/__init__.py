"""Model code: what a checkpoint is (``spec``), how it computes (``layers``, ``rotary``,
``llama``, ``moe``), which class serves which architecture (``registry``) and how
weights get onto a device (``loader``). Entry points: ``ModelSpec.from_hf_config``
and ``load_model``.
"""
