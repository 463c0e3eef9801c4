//! Training recipes: one readable file per method (the loop is visible; machinery lives in
//! `optim`, `schedule`, `clip`, `checkpoint`, `metrics`, `report`, `data`, `training`).
pub mod dpo;
pub mod orpo;
pub mod preference;
pub mod recipe;
pub mod sft;
pub mod grpo;
