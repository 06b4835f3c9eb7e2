//! Chat templates (Jinja, as shipped in `tokenizer_config.json` or GGUF metadata), rendered
//! with minijinja plus Python-compatible string methods that real templates use.

use crate::error::{ModelError, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Renders `template` for `messages`, ending with the assistant prompt when asked.
pub fn render(template: &str, messages: &[Message], bos_token: &str, eos_token: &str, add_generation_prompt: bool) -> Result<String> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    let bad = |e: Error| ModelError::Invalid { flag: "--chat", message: format!("chat template: {e:#}") };
    env.add_template("chat", template).map_err(bad)?;
    let tmpl = env.get_template("chat").map_err(bad)?;
    tmpl.render(context! {
        messages => messages,
        bos_token => bos_token,
        eos_token => eos_token,
        add_generation_prompt => add_generation_prompt,
    })
    .map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let msgs = [Message { role: "user".into(), content: " hi ".into() }];
        assert_eq!(render(t, &msgs, "", "", true).unwrap(), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        let err = render("{{ raise_exception('no system role') }}", &msgs, "", "", true).unwrap_err();
        assert!(err.to_string().contains("no system role"));
    }
}
