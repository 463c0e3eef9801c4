//! Training recipes: one readable file per method (the loop is visible; machinery lives in
//! `optim`, `schedule`, `clip`, `checkpoint`, `metrics`, `report`, `data`, `training`).
pub mod sft;
pub mod grpo;
