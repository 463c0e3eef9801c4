//! Dataset formats, validation, chat templates, loss masks, batching.
