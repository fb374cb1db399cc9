//! The text parsers: UAPI requests and wg-quick files.

use std::str::FromStr;

use wiremesh_proto::uapi::{self, Request};
use wiremesh_proto::wgconf::WgConfig;

/// A UAPI request as the agent's socket reads it (`proto::uapi::parse_request`).
///
/// Checks that an error names a line of the request.
pub fn uapi(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match uapi::parse_request(text) {
        Ok(Request::Get | Request::Set(_)) => {}
        Err(e) => {
            let lines = text.split('\n').count().max(1);
            assert!(
                (1..=lines).contains(&e.line()),
                "error line {} of {lines}: {e}",
                e.line()
            );
            let _ = (e.errno(), e.to_string());
        }
    }
}

/// A wg-quick file (`WgConfig::from_str`).
///
/// Checks that a file that parses prints as one that parses to the same configuration.
pub fn wgconf(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match WgConfig::from_str(text) {
        Ok(config) => {
            let printed = config.to_string();
            let again = WgConfig::from_str(&printed);
            assert_eq!(again.as_ref(), Ok(&config), "printed as:\n{printed}");
        }
        Err(e) => {
            let _ = (e.line(), e.to_string());
        }
    }
}
