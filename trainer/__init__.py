"""Training, evaluation and serving jobs. The jobs and their builders live at this package's root;
``runtime`` holds the loop's state and process plumbing, ``evaluation`` the metrics and
validation, ``serving`` export and retrieval, ``negatives`` the step's negative sources, and
``mips`` exact maximum-inner-product search."""
