"""model-exporter: the fine-tuned adapter or model leaves the TrainJob's volume for S3, the Hugging Face Hub,
a mounted volume, and optionally Kubeflow Model Registry (docs/exporter.md).

It reuses the initializers' shared code rather than copying it: STORAGE_URI parsing, the S3 credential chain,
region handling and error mapping (`pkg.initializers.sources.s3.S3Source`), retries with backoff
(`transfer.retry`), local files read in blocks for their checksums (`blocks`), secret redaction and one-line
errors (`errors`), progress lines (`progress`). The image ships `pkg/initializers` and this package; the
initializer images do not ship this one.

    outputs     what to export from SOURCE_PATH (EXPORT = adapter | model | all)
    s3          multipart, resumable, verified upload; a manifest object written last
    local       file:// destination: verified copies renamed into place; a manifest written last
    hub         one Hub commit with huggingface_hub (LFS for large files) and a model card
    card        the model card, from summary.json and the initializers' markers
    registry    Kubeflow Model Registry registration with the `model-registry` client
    main        config -> select -> upload -> register; exit codes like the initializers'
"""
