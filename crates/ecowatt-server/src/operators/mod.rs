//! Operators and what they did: bearer tokens with roles (stored only as
//! hashes; the last admin token cannot be revoked), and the audit log
//! ([`audit`]) every change is written to, in the change's own transaction.

pub mod audit;

use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;

pub use audit::AuditEntry;

use crate::db::{Db, StoreError, StoreResult, corrupt};
use crate::domain::Invalid;

/// An operator role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// May do everything.
    Admin,
    /// May read everything and change nothing.
    Viewer,
}

impl Role {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// An operator token's record (the token itself is stored only as a hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Token {
    /// Numeric id.
    pub id: i64,
    /// Who or what it is for.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was created.
    pub created_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<i64>,
}

/// Hex SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A new operator token: `ewt_` and 40 hex digits (160 random bits).
pub fn generate_token() -> String {
    format!("ewt_{}", crate::random_hex(20))
}

/// Whether revoking token `id` leaves an admin, among the active admin
/// tokens `admins`.
pub fn leaves_an_admin(admins: &[i64], id: i64) -> bool {
    admins.iter().any(|&a| a != id)
}

fn token_from(row: &AnyRow) -> StoreResult<Token> {
    let role: String = row.try_get("role")?;
    Ok(Token {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: Role::parse(&role).ok_or_else(|| corrupt("role", &role))?,
        created_ms: row.try_get("created_ms")?,
        revoked_ms: row.try_get("revoked_ms")?,
    })
}

/// Tokens and the audit log.
#[derive(Clone)]
pub struct Operators {
    db: Db,
}

impl Operators {
    /// Over `db`.
    pub fn new(db: Db) -> Self {
        Operators { db }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Number of tokens, revoked ones included.
    pub async fn count(&self) -> StoreResult<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM tokens")
            .fetch_one(self.db.reader())
            .await?
            .try_get("n")?)
    }

    /// Stores a new token by its hash.
    pub async fn create(
        &self,
        name: &str,
        role: Role,
        hash: &str,
        actor: &str,
        now: i64,
    ) -> StoreResult<Token> {
        if name.trim().is_empty() || name.len() > 64 {
            return Err(Invalid::new("name", "1 to 64 characters").into());
        }
        let mut tx = self.db.write().await?;
        let row = sqlx::query(
            "INSERT INTO tokens (name, role, token_hash, created_ms) VALUES ($1, $2, $3, $4) RETURNING *",
        )
        .bind(name)
        .bind(role.as_str())
        .bind(hash)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let token = token_from(&row)?;
        let detail = json!({"name": name, "role": role});
        audit::record(&mut tx, now, actor, "token.create", &token.id.to_string(), detail).await?;
        tx.commit().await?;
        Ok(token)
    }

    /// Every token.
    pub async fn list(&self) -> StoreResult<Vec<Token>> {
        let rows =
            sqlx::query("SELECT * FROM tokens ORDER BY id").fetch_all(self.db.reader()).await?;
        rows.iter().map(token_from).collect()
    }

    /// Revokes a token; never the last active admin token
    /// (`last_admin_token`: there would be no way back in but `--local`).
    pub async fn revoke(&self, id: i64, actor: &str, now: i64) -> StoreResult<Token> {
        let mut tx = self.db.write().await?;
        let sql = format!("SELECT * FROM tokens WHERE id = $1{}", self.db.for_update());
        let row = sqlx::query(&sql).bind(id).fetch_optional(&mut *tx).await?;
        let token = row
            .as_ref()
            .map(token_from)
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("token {id}")))?;
        if token.revoked_ms.is_some() {
            return Err(StoreError::Conflict(format!("token {id} is already revoked")));
        }
        if token.role == Role::Admin {
            // Every active admin row locked: two revocations at once cannot
            // each leave the other as the last.
            let sql = format!(
                "SELECT id FROM tokens WHERE role = 'admin' AND revoked_ms IS NULL{}",
                self.db.for_update()
            );
            let admins = sqlx::query(&sql)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get("id"))
                .collect::<Result<Vec<i64>, _>>()?;
            if !leaves_an_admin(&admins, id) {
                return Err(StoreError::Refused {
                    code: "last_admin_token",
                    message: format!(
                        "token {id} is the last admin token: create another admin token first \
                         (on the server's machine, `ecowatt token create NAME --role admin --local` \
                         works without one)"
                    ),
                });
            }
        }
        sqlx::query("UPDATE tokens SET revoked_ms = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let detail = json!({"name": token.name});
        audit::record(&mut tx, now, actor, "token.revoke", &id.to_string(), detail).await?;
        tx.commit().await?;
        Ok(Token { revoked_ms: Some(now), ..token })
    }

    /// The active token with this hash.
    pub async fn by_hash(&self, hash: &str) -> StoreResult<Option<Token>> {
        let row = sqlx::query("SELECT * FROM tokens WHERE token_hash = $1 AND revoked_ms IS NULL")
            .bind(hash)
            .fetch_optional(self.db.reader())
            .await?;
        row.as_ref().map(token_from).transpose()
    }

    /// Audit entries, newest first.
    pub async fn audit(&self, before_id: Option<i64>, limit: i64) -> StoreResult<Vec<AuditEntry>> {
        audit::list(&self.db, before_id, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_active_admin_stays() {
        for (admins, id, leaves) in
            [(&[1][..], 1, false), (&[1, 2][..], 1, true), (&[2][..], 1, true), (&[][..], 1, false)]
        {
            assert_eq!(leaves_an_admin(admins, id), leaves, "{admins:?} without {id}");
        }
    }

    #[test]
    fn tokens_are_stored_as_hashes() {
        let t = generate_token();
        assert!(t.starts_with("ewt_") && t.len() == 44, "{t}");
        assert_eq!(hash_token(&t).len(), 64);
        assert_ne!(hash_token(&t), hash_token(&generate_token()));
    }
}
