from mergelab.evaluate.continual import average_accuracy, average_forgetting, backward_transfer, continual_summary, forgetting
