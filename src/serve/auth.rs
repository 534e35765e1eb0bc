//! Users, password hashes and bearer tokens of the Flight SQL server.
//!
//! Users live in the project's `users.yaml` (written by `crmcube user add`), each with a role
//! and an argon2id password hash in PHC form — never a password. A Flight SQL Handshake with
//! Basic credentials returns a random bearer token that expires after the server's token
//! lifetime; every other call must carry a live token. Repeated wrong passwords for one user
//! name are refused for a while ([`LOCKOUT`]) so that passwords cannot be guessed at speed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;
use serde::{Deserialize, Serialize};

pub use crate::access::Principal;
use crate::error::{Diagnostic, Error, Result, SpecErrors};

/// `users.yaml` as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    pub version: u32,
    #[serde(default)]
    pub users: Vec<User>,
}

/// One user of the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// The role access rules are written for (e.g. `manager`, `rep`).
    pub role: String,
    /// argon2id hash in PHC string form (`$argon2id$v=19$...`).
    pub password_hash: String,
    /// Values access rules may refer to, e.g. `region: East` for a sales rep.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

impl UsersFile {
    /// Reads `path`; a missing file means no users yet.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(UsersFile { version: 1, users: Vec::new() });
        }
        let file: UsersFile = crate::project::load_yaml(path)?;
        let mut errors = Vec::new();
        crate::project::check_version(path, file.version, &mut errors);
        for u in &file.users {
            if PasswordHash::new(&u.password_hash).is_err() {
                errors.push(Diagnostic {
                    file: path.to_path_buf(),
                    line: 0,
                    column: 0,
                    key: format!("user '{}' › password_hash", u.name),
                    message: "not a PHC password hash".into(),
                    hint: Some(format!("set the password again with `crmcube user add {} --role {}`", u.name, u.role)),
                });
            }
        }
        if !errors.is_empty() {
            return Err(SpecErrors(errors).into());
        }
        Ok(file)
    }

    /// The principal of user `name` (for `crmcube --as NAME`, which trusts the caller).
    pub fn principal(&self, name: &str) -> Result<Principal> {
        match self.users.iter().find(|u| u.name == name) {
            Some(u) => Ok(Principal { user: u.name.clone(), role: u.role.clone(), attributes: u.attributes.clone() }),
            None => Err(crate::error::QueryError::new(format!("no user '{name}' in the users file"))
                .with_hint(Some(crate::error::valid_names_hint("users", name, self.users.iter().map(|u| u.name.as_str()))))
                .into()),
        }
    }

    /// Adds `name` or replaces its role, attributes and password.
    pub fn upsert(&mut self, name: &str, role: &str, password: &str, attributes: BTreeMap<String, String>) -> Result<()> {
        let user = User { name: name.into(), role: role.into(), password_hash: hash_password(password)?, attributes };
        match self.users.iter_mut().find(|u| u.name == name) {
            Some(u) => *u = user,
            None => self.users.push(user),
        }
        Ok(())
    }

    /// Writes the file atomically (a reader never sees half a file).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_saphyr::to_string(self).map_err(|e| Error::Internal(format!("users file: {e}")))?;
        let header = "# Users of `crmcube serve`. Passwords are argon2id hashes; set them with `crmcube user add`.\n";
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, format!("{header}{text}")).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }
}

/// Hashes a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> Result<String> {
    if password.is_empty() {
        return Err(crate::error::QueryError::new("the password is empty").into());
    }
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Argon2::default().hash_password(password.as_bytes(), &salt).map_err(|e| Error::Internal(e.to_string()))?.to_string())
}

/// Why a login or token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// Unknown user or wrong password (never says which).
    BadCredentials,
    /// Too many wrong passwords for this user name lately.
    LockedOut { seconds: u64 },
    /// The token is unknown or has expired.
    BadToken,
}

/// Wrong passwords allowed per user name before [`LOCKOUT`] applies.
pub const MAX_FAILURES: u32 = 5;
/// How long a user name is refused after [`MAX_FAILURES`] wrong passwords.
pub const LOCKOUT: Duration = Duration::from_secs(30);

/// Users, live tokens and recent failures.
pub struct Authenticator {
    users: HashMap<String, User>,
    ttl: Duration,
    tokens: Mutex<HashMap<String, (Principal, Instant)>>,
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Authenticator {
    pub fn new(users: UsersFile, ttl: Duration) -> Self {
        Self {
            users: users.users.into_iter().map(|u| (u.name.clone(), u)).collect(),
            ttl,
            tokens: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Checks a user name and password; returns a new bearer token.
    pub fn login(&self, name: &str, password: &str) -> std::result::Result<String, AuthError> {
        {
            let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((n, last)) = failures.get(name)
                && *n >= MAX_FAILURES
                && last.elapsed() < LOCKOUT
            {
                return Err(AuthError::LockedOut { seconds: (LOCKOUT - last.elapsed()).as_secs().max(1) });
            }
        }
        let ok = self.users.get(name).is_some_and(|u| {
            PasswordHash::new(&u.password_hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
        });
        if !ok {
            let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let entry = failures.entry(name.to_string()).or_insert((0, Instant::now()));
            if entry.1.elapsed() >= LOCKOUT {
                entry.0 = 0;
            }
            entry.0 += 1;
            entry.1 = Instant::now();
            return Err(AuthError::BadCredentials);
        }
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        let user = &self.users[name];
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let principal = Principal { user: user.name.clone(), role: user.role.clone(), attributes: user.attributes.clone() };
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.retain(|_, (_, expires)| *expires > Instant::now());
        tokens.insert(token.clone(), (principal, Instant::now() + self.ttl));
        Ok(token)
    }

    /// The principal of a live token.
    pub fn check(&self, token: &str) -> std::result::Result<Principal, AuthError> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        match tokens.get(token) {
            Some((p, expires)) if *expires > Instant::now() => Ok(p.clone()),
            _ => Err(AuthError::BadToken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> UsersFile {
        let mut f = UsersFile { version: 1, users: Vec::new() };
        f.upsert("ann", "manager", "s3cret", BTreeMap::new()).unwrap();
        f
    }

    #[test]
    fn stores_hashes_and_checks_passwords() {
        let f = users();
        assert!(f.users[0].password_hash.starts_with("$argon2id$"), "{}", f.users[0].password_hash);
        assert!(!f.users[0].password_hash.contains("s3cret"));
        let auth = Authenticator::new(f, Duration::from_secs(60));
        let token = auth.login("ann", "s3cret").unwrap();
        assert_eq!(auth.check(&token).unwrap().role, "manager");
        assert_eq!(auth.login("ann", "wrong"), Err(AuthError::BadCredentials));
        assert_eq!(auth.login("bob", "s3cret"), Err(AuthError::BadCredentials));
        assert_eq!(auth.check("not-a-token"), Err(AuthError::BadToken));
    }

    #[test]
    fn tokens_expire() {
        let auth = Authenticator::new(users(), Duration::ZERO);
        let token = auth.login("ann", "s3cret").unwrap();
        assert_eq!(auth.check(&token), Err(AuthError::BadToken));
    }

    #[test]
    fn repeated_wrong_passwords_lock_the_name_out() {
        let auth = Authenticator::new(users(), Duration::from_secs(60));
        for _ in 0..MAX_FAILURES {
            assert_eq!(auth.login("ann", "guess"), Err(AuthError::BadCredentials));
        }
        assert!(matches!(auth.login("ann", "s3cret"), Err(AuthError::LockedOut { .. })), "even the right password waits");
    }
}
