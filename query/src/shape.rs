//! Bounds on the shape of a SQL text, checked before planning: the planner and the
//! optimiser recurse over the expression tree, so a long chain of `+`, `AND` or `UNION ALL`
//! is a stack overflow waiting to happen. Each bound names itself in a `bad_sql` error.
//!
//! ```text
//!  text (≤ MAX_SQL_BYTES) ─▶ tokens, no recursion: count ≤ MAX_TOKENS, operators ≤ MAX_OPERATORS
//!        │   (an operator chain is as deep as it is long, so this bounds the tree's depth
//!        ▼    before any recursive walk of it)
//!  parse ─▶ walk: expression nesting ≤ MAX_DEPTH, SELECTs ≤ MAX_SELECTS, expressions ≤ MAX_EXPRESSIONS
//! ```

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{Expr, Select, Visit, Visitor};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::QueryError;

/// Longest SQL text.
pub const MAX_SQL_BYTES: usize = 256 * 1024;
/// Most tokens (the width of a query: select lists, IN lists, values).
pub const MAX_TOKENS: usize = 65_536;
/// Most binary operators and joining keywords (`+`, `=`, `AND`, `OR`, `UNION`, ...).
pub const MAX_OPERATORS: usize = 2_048;
/// Deepest nesting of expressions.
pub const MAX_DEPTH: usize = 256;
/// Most SELECT blocks (each arm of a UNION, each subquery).
pub const MAX_SELECTS: usize = 256;
/// Most expression nodes.
pub const MAX_EXPRESSIONS: usize = 100_000;

fn refuse(message: String) -> QueryError {
    QueryError::new(400, "bad_sql", message)
}

/// Checks `sql` against the bounds; parse errors are left to the planner.
pub fn check(sql: &str) -> Result<(), QueryError> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(refuse(format!(
            "the query is {} bytes long; the limit is {MAX_SQL_BYTES}",
            sql.len()
        )));
    }
    let dialect = GenericDialect {};
    // A text that does not tokenise is the parser's to report, with its position.
    let Ok(tokens) = Tokenizer::new(&dialect, sql).tokenize() else {
        return Ok(());
    };
    let mut count = 0usize;
    let mut operators = 0usize;
    for token in &tokens {
        match token {
            Token::Whitespace(_) => continue,
            Token::Plus
            | Token::Minus
            | Token::Mul
            | Token::Div
            | Token::DuckIntDiv
            | Token::Mod
            | Token::StringConcat
            | Token::DoubleEq
            | Token::Eq
            | Token::Neq
            | Token::Lt
            | Token::Gt
            | Token::LtEq
            | Token::GtEq
            | Token::Spaceship
            | Token::Ampersand
            | Token::Pipe
            | Token::Caret
            | Token::ShiftLeft
            | Token::ShiftRight
            | Token::Arrow
            | Token::LongArrow
            | Token::HashArrow
            | Token::HashLongArrow
            | Token::LParen => operators += 1,
            Token::Word(word)
                if matches!(
                    word.keyword,
                    Keyword::AND
                        | Keyword::OR
                        | Keyword::XOR
                        | Keyword::NOT
                        | Keyword::UNION
                        | Keyword::INTERSECT
                        | Keyword::EXCEPT
                        | Keyword::IS
                        | Keyword::LIKE
                        | Keyword::ILIKE
                        | Keyword::BETWEEN
                        | Keyword::CASE
                        | Keyword::WHEN
                ) =>
            {
                operators += 1;
            }
            _ => {}
        }
        count += 1;
    }
    if count > MAX_TOKENS {
        return Err(refuse(format!(
            "the query has {count} tokens; the limit is {MAX_TOKENS}"
        )));
    }
    if operators > MAX_OPERATORS {
        return Err(refuse(format!(
            "the query has {operators} operators, parentheses and joining keywords (+, =, AND, OR, UNION, …); the limit is {MAX_OPERATORS}: use IN (…) lists or a CTE instead of long chains"
        )));
    }
    let Ok(statements) = datafusion::sql::parser::DFParser::parse_sql(sql) else {
        return Ok(());
    };
    let mut shape = Shape::default();
    for statement in &statements {
        if let datafusion::sql::parser::Statement::Statement(statement) = statement
            && let ControlFlow::Break(error) = statement.visit(&mut shape)
        {
            return Err(error);
        }
    }
    Ok(())
}

#[derive(Default)]
struct Shape {
    depth: usize,
    expressions: usize,
    selects: usize,
}

impl Visitor for Shape {
    type Break = QueryError;

    fn pre_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<QueryError> {
        self.depth += 1;
        self.expressions += 1;
        if self.depth > MAX_DEPTH {
            return ControlFlow::Break(refuse(format!(
                "expressions are nested more than {MAX_DEPTH} deep, the limit: a chain of AND, OR or arithmetic that long should be an IN (…) list, a CTE or a join"
            )));
        }
        if self.expressions > MAX_EXPRESSIONS {
            return ControlFlow::Break(refuse(format!(
                "the query has more than {MAX_EXPRESSIONS} expressions, the limit"
            )));
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<QueryError> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, _select: &Select) -> ControlFlow<QueryError> {
        self.selects += 1;
        if self.selects > MAX_SELECTS {
            return ControlFlow::Break(refuse(format!(
                "the query has more than {MAX_SELECTS} SELECT blocks (UNION arms and subqueries), the limit"
            )));
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(term: &str, separator: &str, count: usize) -> String {
        vec![term; count].join(separator)
    }

    #[test]
    fn the_bounds_name_themselves_and_ordinary_queries_pass() {
        for sql in [
            format!("SELECT {}", chain("1", "+", 2000)),
            format!("SELECT 1 WHERE {}", chain("true", " AND ", 2000)),
            format!("SELECT 1 WHERE {}", chain("false", " OR ", 2000)),
            chain("SELECT 1", " UNION ALL ", 5000),
        ] {
            let error = check(&sql).unwrap_err();
            assert_eq!((error.status, error.error), (400, "bad_sql"), "{error}");
            assert!(error.message.contains("limit"), "{error}");
        }
        let deep = format!("SELECT 1 WHERE {}", chain("x = 1", " OR ", 300));
        assert!(check(&deep).unwrap_err().message.contains("nested more than 256"));
        let arms = chain("SELECT 1", " UNION ALL ", 300);
        assert!(check(&arms).unwrap_err().message.contains("SELECT blocks"));
        assert!(
            check(&"x".repeat(MAX_SQL_BYTES + 1))
                .unwrap_err()
                .message
                .contains("bytes long")
        );
        let wide = format!("SELECT {}", chain("1", ", ", 40_000));
        assert!(check(&wide).unwrap_err().message.contains("tokens"));
        // What an analyst writes passes, long IN lists included.
        for sql in [
            "SELECT kind, count(*) FROM events WHERE realm = 'eng' AND ts > now() - INTERVAL '1 day' GROUP BY kind"
                .to_owned(),
            format!("SELECT * FROM events WHERE agent IN ({})", chain("'a'", ", ", 5000)),
            format!("SELECT 1 WHERE {}", chain("x = 1", " OR ", 100)),
            chain("SELECT 1", " UNION ALL ", 100),
            "SELECT (((((1)))))".to_owned(),
            "not even sql".to_owned(),
        ] {
            if let Err(error) = check(&sql) {
                panic!("{error}: {}", &sql[..sql.len().min(120)]);
            }
        }
    }
}
