//! `GIT_ASKPASS` served by this binary: git runs it with a prompt as the only argument
//! and reads the answer from stdout. The token comes from an environment variable that
//! only the git child (and therefore this helper) has.

/// Set on the git child to make this binary answer as askpass.
pub const MODE_VAR: &str = "REPOBOX_ASKPASS";
/// Holds the token for the askpass helper; set only on git children that talk to a remote.
pub const TOKEN_VAR: &str = "REPOBOX_GIT_TOKEN";
/// The user name sent with the token, as the contract says.
pub const USERNAME: &str = "oauth2";

/// Whether this process was started as the askpass helper.
pub fn is_askpass_invocation() -> bool {
    std::env::var_os(MODE_VAR).is_some_and(|v| v == "1")
}

/// The answer to a git prompt: the user name for "Username for ...", the token otherwise.
pub fn answer(prompt: &str, token: Option<&str>) -> Option<String> {
    if prompt
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("username")
    {
        Some(USERNAME.to_owned())
    } else {
        token.map(str::to_owned)
    }
}

/// Runs as the helper: prints the answer, returns the exit code.
pub fn main() -> i32 {
    let prompt = std::env::args().nth(1).unwrap_or_default();
    let token = std::env::var(TOKEN_VAR).ok();
    match answer(&prompt, token.as_deref()) {
        Some(a) => {
            println!("{a}");
            0
        }
        None => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_username_and_password_prompts() {
        assert_eq!(
            answer("Username for 'https://h': ", Some("t")).as_deref(),
            Some("oauth2")
        );
        assert_eq!(
            answer("Password for 'https://oauth2@h': ", Some("t")).as_deref(),
            Some("t")
        );
        assert_eq!(answer("Password for 'https://oauth2@h': ", None), None);
    }
}
