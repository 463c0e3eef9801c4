//! Hub ids resolve through the local Hugging Face cache (no download at run time).
use candle_core::{DType, Device};
use std::path::PathBuf;

#[test]
fn hub_id_resolves_from_the_hf_cache_and_missing_ids_explain() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("hub/models--tiny-org--llama-tiny");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/models/llama-tiny");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    // This test binary holds only this test, so setting the variable is race-free.
    std::env::set_var("HF_HOME", tmp.path());
    std::env::remove_var("HF_HUB_CACHE");
    let loaded = lora_models::load_model("tiny-org/llama-tiny", &Device::Cpu, DType::F32).unwrap();
    assert_eq!(loaded.model.config().num_hidden_layers, 2);
    assert_eq!(loaded.source, "tiny-org/llama-tiny");
    let err = lora_models::load_model("tiny-org/absent", &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(err.contains("not found in the Hugging Face cache"), "{err}");
}
