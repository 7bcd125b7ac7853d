//! The `webhook` action: a JSON POST signed with HMAC-SHA256, retried with backoff.

use hmac::{Hmac, Mac};

/// `sha256=<hex>` of HMAC-SHA256(secret, body): the `X-Custos-Signature` header.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable_key());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn unreachable_key() -> Hmac<sha2::Sha256> {
    // new_from_slice only fails for fixed-size-key MACs; keep a defined fallback anyway.
    Hmac::<sha2::Sha256>::new_from_slice(b"custos").unwrap_or_else(|_| std::process::abort())
}

/// Posts `body`; retries on errors and 5xx with 100 ms, 200 ms, 400 ms... backoff.
/// Returns the number of attempts made, or the last error.
pub fn send(url: &str, secret: &[u8], body: &serde_json::Value, timeout_ms: u64, retries: u32) -> Result<u32, String> {
    let bytes = serde_json::to_vec(body).map_err(|error| error.to_string())?;
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_millis(timeout_ms))
        .build()
        .map_err(|error| error.to_string())?;
    let mut last = String::new();
    for attempt in 0..=retries {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_millis(100 << (attempt - 1).min(6)));
        }
        match client
            .post(url)
            .header("content-type", "application/json")
            .header("x-custos-signature", signature(secret, &bytes))
            .body(bytes.clone())
            .send()
        {
            Ok(response) if response.status().is_success() => return Ok(attempt + 1),
            Ok(response) if response.status().is_client_error() => {
                return Err(format!("`{url}` answered {}", response.status()));
            }
            Ok(response) => last = format!("`{url}` answered {}", response.status()),
            Err(error) => last = format!("`{url}`: {error}"),
        }
    }
    Err(format!("gave up after {} attempts: {last}", retries + 1))
}
