//! Tokens encrypted by Node's own `crypto` module (see `data/make_node_vectors.js`)
//! decrypt to the same text here, with the key in each accepted form, and our own
//! encryption with the same IV yields the very same envelope.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use repobox_contract::EncryptionKey;

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Vector {
    key_format: String,
    key: String,
    token: String,
    encrypted: String,
}

#[derive(serde::Deserialize)]
struct File {
    vectors: Vec<Vector>,
}

#[test]
fn node_crypto_vectors_decrypt_and_reencrypt_identically() {
    let file: File =
        serde_json::from_str(include_str!("data/node_vectors.json")).expect("vector file parses");
    assert!(file.vectors.len() >= 12);
    let mut formats = std::collections::BTreeSet::new();
    for v in &file.vectors {
        formats.insert(v.key_format.clone());
        let key = EncryptionKey::parse(&v.key)
            .unwrap_or_else(|e| panic!("{} key refused: {e}", v.key_format));
        let token = key.decrypt(&v.encrypted).expect("node envelope decrypts");
        assert_eq!(token.expose(), v.token, "{} key", v.key_format);

        let iv: [u8; 12] = STANDARD
            .decode(v.encrypted.split(':').next().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(key.encrypt_with_iv(&v.token, iv), v.encrypted);
    }
    assert_eq!(
        formats.into_iter().collect::<Vec<_>>(),
        ["base64", "hex", "raw"]
    );
}
