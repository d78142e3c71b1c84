"""Document filters of the facts_qa tasks: one template split each."""


def heldout_docs(dataset):
    """Items whose prompt comes from a held-out template."""
    return dataset.filter(lambda doc: doc["template_split"] == "heldout")


def train_docs(dataset):
    """Items whose prompt comes from a training template."""
    return dataset.filter(lambda doc: doc["template_split"] == "train")
