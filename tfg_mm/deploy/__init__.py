"""From a trained run to a deployed inspector: :mod:`.predict` (detections on new images, folders and video),
:mod:`.export` (ONNX with the post-processing in the graph, checked against PyTorch) and :mod:`.benchmark`
(parameters, GFLOPs, latency and throughput per runtime, written to ``{run_dir}/deploy.json``)."""
