"""Tuneboard home page (filled in by the dashboard work)."""
import streamlit as st

st.set_page_config(page_title="Tuneboard", layout="wide")
st.title("Tuneboard")
st.write("Fine-tune an ImageNet-pretrained classifier on your own photos.")
