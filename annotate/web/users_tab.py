"""The Users tab of `preflab serve --auth` (admins): the accounts, and adding one,
resetting a password, changing a role, removing one, without a shell on the server.

    from annotate.web.users_tab import build_users_tab
    with gr.Tabs():
        build_users_tab(demo, ctx, guard)   # ctx.user_admin: annotate.user_admin.UserAdmin

The tab exists only with --auth. The work and its rules are annotate/user_admin.py's;
here are the form and the table. The password box is emptied after every action, and
nothing here ever shows a password or a hash; a refused change is reported beside the
form. (No `from __future__ import annotations`:
gradio reads the handlers' `request: gr.Request` annotations as objects.)
"""

from annotate.users import MIN_PASSWORD_LENGTH, NAME_RULE, ROLES
from annotate.web.html import escape
from trainer.errors import PreflabError


def users_html(rows: list[dict[str, str]]) -> str:
    if not rows:
        return '<p class="review-note">No accounts.</p>'
    body = "".join(
        f'<tr data-user="{escape(r["name"])}"><td>{escape(r["name"])}</td><td>{escape(r["role"])}</td></tr>'
        for r in rows
    )
    admins = sum(r["role"] == "admin" for r in rows)
    return (
        f'<p class="review-note">{len(rows)} accounts, {admins} admin{"s" if admins != 1 else ""}.</p>'
        f'<table class="review-table" id="users-table"><tr><th>name</th><th>role</th></tr>{body}</table>'
    )


def build_users_tab(demo, ctx, guard) -> None:
    import gradio as gr

    admin = ctx.user_admin
    if admin is None or admin.accounts is None:
        return  # no --auth: one local user, nothing to manage
    with gr.Tab("Users", id="users", visible=False) as tab:
        gr.Markdown(
            "Accounts of this server (the users file it was started with). A new password, a new "
            "role or a removal ends that person's sessions at once; their votes stay in the store. "
            f"Names: {NAME_RULE}. Passwords: at least {MIN_PASSWORD_LENGTH} characters, not "
            "containing the name."
        )
        u_table = gr.HTML(js_on_load=None, elem_id="users-list")
        with gr.Row():
            u_name = gr.Textbox(label="Name", max_lines=1, max_length=64, elem_id="users-name")
            u_role = gr.Radio(list(ROLES), value="annotator", label="Role", elem_id="users-role")
            u_password = gr.Textbox(
                label="Password (for Add and Reset)",
                type="password",
                max_lines=1,
                max_length=1024,
                elem_id="users-password",
            )
        with gr.Row():
            u_add = gr.Button("Add", variant="primary", size="sm", elem_id="users-add")
            u_reset = gr.Button("Reset password", size="sm", elem_id="users-reset")
            u_role_btn = gr.Button("Change role", size="sm", elem_id="users-set-role")
            u_remove = gr.Button("Remove", variant="stop", size="sm", elem_id="users-remove")
        u_report = gr.Markdown(elem_id="users-report")

    def listing(caller: str) -> str:
        with guard.errors():
            return users_html(admin.list(caller))

    def on_load(request: gr.Request):
        return gr.Tab(visible=guard.is_admin(request))

    def on_open(request: gr.Request):
        return listing(guard.admin(request))

    def act(do):
        def handler(name, role, password, request: gr.Request):
            caller = guard.admin(request)
            try:
                report = f"Done: {escape(do(caller, name, role, password))}"
            except PreflabError as e:  # shown beside the form, so the password box still empties
                report = f"Refused: {escape(str(e))}"
            # The password box empties whatever happened; the table shows the file as it is now.
            return report, listing(caller), ""

        return handler

    kw = dict(api_visibility="private", concurrency_limit=1, concurrency_id="users", show_progress="hidden")
    outputs = [u_report, u_table, u_password]
    inputs = [u_name, u_role, u_password]
    demo.load(on_load, None, tab, api_visibility="private", show_progress="hidden", concurrency_limit=None)
    tab.select(on_open, None, [u_table], **kw)
    u_add.click(act(lambda c, n, r, p: admin.add(c, n, r, p)), inputs, outputs, **kw)
    u_reset.click(act(lambda c, n, r, p: admin.reset_password(c, n, p)), inputs, outputs, **kw)
    u_role_btn.click(act(lambda c, n, r, p: admin.set_role(c, n, r)), inputs, outputs, **kw)
    u_remove.click(act(lambda c, n, r, p: admin.remove(c, n)), inputs, outputs, **kw)
